"""The service: finding frames, running them through the pipeline, and the faces of the daemon.

``watcher`` reports paths that changed (inotify or polling), ``scanner`` says which files are
complete and in what capture order, ``feeder`` turns both into a bounded queue, ``ledger``
says whether a file's content was already taken, ``pipeline`` takes one frame through
calibration, measurement, judgement, registration and integration and journals the outcome,
``checkpoint`` makes that survive a restart, ``reload`` sorts the changes of a SIGHUP, and
``daemon`` runs the worker loop between them; ``notify``, ``metrics`` and ``web`` are what
systemd, Prometheus and a browser see of it.
"""
