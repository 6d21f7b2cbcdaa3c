"""The service: finding frames, running them through the pipeline, and the run loop.

``scanner`` reports complete new files in capture order (it decides nothing else),
``pipeline`` takes one frame through calibration, measurement, judgement, registration and
integration and journals the outcome, ``daemon`` loops the two until stopped.
"""
