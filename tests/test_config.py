"""Tests of the typed configuration: loading, strictness, messages, paths and flag overrides.

The messages are part of the product (they are what a user sees at the telescope when a config
is wrong), so most tests assert on what a message says: the key path, the bad value, what is
allowed and, for a file, the line.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from subwatch.config import (
    Config,
    ConfigError,
    apply_overrides,
    default_config_yaml,
    format_validation_error,
    load_config,
    render_config_yaml,
    split_listen,
)

SHIPPED = Path(__file__).resolve().parents[1] / "config" / "subwatch.yaml"


def write(tmp_path: Path, text: str, name: str = "subwatch.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Run each test from its own folder, so files can be named as a user would name them on
    # the command line, and messages start with that name.
    monkeypatch.chdir(tmp_path)


def problems_of(tmp_path: Path, text: str) -> str:
    """Write ``text`` as ./subwatch.yaml and return the message load_config refuses it with."""
    write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config("subwatch.yaml")
    return str(info.value)


def sections() -> dict[str, type[BaseModel]]:
    return {name: field.annotation for name, field in Config.model_fields.items()}


# --------------------------------------------------------------------------------------------
# Defaults and good files
# --------------------------------------------------------------------------------------------


def test_defaults() -> None:
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.watch.path is None
    assert cfg.watch.include == ["*.fits", "*.fit", "*.fts", "*.fz", "*.xisf", "*.tif", "*.tiff"]
    assert cfg.watch.ignore == [".*", "~*", "*.tmp", "*.part"]
    assert cfg.watch.mode == "auto"
    assert cfg.output.path == Path("subwatch-out")
    assert cfg.frames.max_dimension == 20000
    assert cfg.stacking.rejection == "kappa-sigma"
    assert cfg.stacking.kappa == 3.0
    assert cfg.previews.products == ["preview", "denoised", "deconvolved"]
    assert (cfg.denoise.tile, cfg.denoise.overlap) == (512, 48)
    assert cfg.deconvolution.psf_size == 25
    assert cfg.http.listen == "127.0.0.1:8750"
    assert (cfg.http.host, cfg.http.port) == ("127.0.0.1", 8750)
    assert cfg.http.token is None
    assert (cfg.logging.level, cfg.logging.format) == ("INFO", "text")


def test_default_lists_are_not_shared() -> None:
    a, b = Config(), Config()
    a.watch.include.append("*.cr2")
    assert "*.cr2" not in b.watch.include


@pytest.mark.parametrize(
    "text",
    ["", "\n", "# only a comment\n", "---\n", "stacking:\n  # kappa: 2\ngates:\n"],
    ids=["empty", "blank", "comment", "document-marker", "empty-sections"],
)
def test_empty_file_or_sections_mean_defaults(tmp_path: Path, text: str) -> None:
    assert load_config(write(tmp_path, text)) == Config()


def test_good_file_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        watch:
          path: /data/captures
          recursive: false
          include: ["*.fits"]
          mode: polling
          settle_seconds: 0
        stacking:
          transform: affine
          kappa: 2.5
          rejection: none
        previews:
          products: [preview]
        denoise:
          tile: 256
          overlap: 127
        deconvolution:
          psf_size: 31
        http:
          listen: "[::1]:9000"
          token: s3cret
        logging:
          format: json
        """,
    )
    cfg = load_config(path)
    assert cfg.watch.path == Path("/data/captures")
    assert cfg.watch.recursive is False
    assert cfg.watch.include == ["*.fits"]
    assert cfg.watch.mode == "polling"
    assert cfg.watch.settle_seconds == 0.0
    assert cfg.stacking.transform == "affine"
    assert cfg.stacking.kappa == 2.5
    assert cfg.stacking.rejection == "none"
    assert cfg.previews.products == ["preview"]
    assert (cfg.denoise.tile, cfg.denoise.overlap) == (256, 127)
    assert cfg.deconvolution.psf_size == 31
    assert (cfg.http.host, cfg.http.port) == ("::1", 9000)
    assert cfg.http.token == "s3cret"
    assert cfg.logging.format == "json"
    # Untouched keys keep their defaults.
    assert cfg.gates == Config().gates


def test_ints_are_accepted_for_floats(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "stacking:\n  kappa: 2\n"))
    assert cfg.stacking.kappa == 2.0
    assert isinstance(cfg.stacking.kappa, float)


@pytest.mark.parametrize("written", ["debug", "Debug", "DEBUG", " warning "])
def test_lowercase_log_level_is_accepted(tmp_path: Path, written: str) -> None:
    cfg = load_config(write(tmp_path, f"logging:\n  level: '{written}'\n"))
    assert cfg.logging.level == written.strip().upper()


# --------------------------------------------------------------------------------------------
# The shipped file
# --------------------------------------------------------------------------------------------


def test_shipped_file_is_all_defaults() -> None:
    data = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    assert Config.model_validate(data) == Config()
    # Loaded as a file, the only difference is that the relative output path is anchored to
    # the file's directory.
    loaded = load_config(SHIPPED)
    assert loaded.output.path == SHIPPED.parent / "subwatch-out"
    loaded.output.path = Config().output.path
    assert loaded == Config()


def test_shipped_file_lists_every_key() -> None:
    data = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    assert list(data) == list(sections())
    for name, model in sections().items():
        assert list(data[name]) == list(model.model_fields), f"section {name!r} drifted"


def test_shipped_file_is_the_generated_default() -> None:
    assert SHIPPED.read_text(encoding="utf-8") == default_config_yaml(), (
        "config/subwatch.yaml is out of date; regenerate it with "
        "`python -m subwatch.config > config/subwatch.yaml`"
    )


def test_every_key_has_a_one_line_description() -> None:
    for name, model in sections().items():
        assert model.__doc__, f"section {name} has no docstring"
        for key, field in model.model_fields.items():
            assert field.description, f"{name}.{key} has no description"
            # "  # " + description must fit on one 100-column line of the YAML file.
            assert len(field.description) <= 96, f"{name}.{key}: description too long"


def test_rendered_config_round_trips(tmp_path: Path) -> None:
    # Absolute paths: a relative one would be re-anchored to the file's folder on loading.
    cfg = apply_overrides(
        Config(), watch=tmp_path / "caps", output=tmp_path / "out", http="0.0.0.0:9999"
    )
    cfg.stacking.kappa = 2.25
    cfg.previews.products = ["denoised"]
    cfg.watch.ignore = []
    cfg.http.token = "no"  # a YAML boolean when unquoted
    text = render_config_yaml(cfg, show_secrets=True)
    assert load_config(write(tmp_path, text)) == cfg
    hidden = render_config_yaml(cfg)
    assert "token: no" not in hidden
    assert '"<hidden>"' in hidden


# --------------------------------------------------------------------------------------------
# Bad files: each kind of problem, and its message
# --------------------------------------------------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message = problems_of(tmp_path, "stacks:\n  kappa: 2\n")
    assert message.startswith("subwatch.yaml: stacks: unknown key (allowed: watch, output,")
    assert "logging)" in message
    assert "at line 1" in message
    assert message.endswith("did you mean 'stacking'?")


def test_unknown_nested_key_suggests_the_nearest(tmp_path: Path) -> None:
    message = problems_of(tmp_path, "watch:\n  recursive: true\n  pathh: /data\n")
    assert message == (
        "subwatch.yaml: watch.pathh: unknown key (allowed: path, recursive, include, ignore, "
        "mode, settle_seconds, poll_seconds, rescan_seconds, incomplete_timeout_seconds), "
        "at line 3; did you mean 'path'?"
    )


def test_unknown_key_without_a_near_match(tmp_path: Path) -> None:
    message = problems_of(tmp_path, "logging:\n  colour: blue\n")
    assert "logging.colour: unknown key (allowed: level, format)" in message
    assert "did you mean" not in message


def test_non_string_key(tmp_path: Path) -> None:
    message = problems_of(tmp_path, "gates:\n  1: 2\n")
    assert "gates.1: unknown key (allowed: enabled, min_stars," in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gates: 'yes'\n", "gates: expected a mapping, got 'yes'"),
        ("gates: yes\n", "gates: expected a mapping, got true"),
        ("http: [1, 2]\n", "http: expected a mapping, got [1, 2]"),
        ("watch:\n  include: '*.fits'\n", "watch.include: expected a list, got '*.fits'"),
        (
            "stacking:\n  kappa: abc\n",
            "stacking.kappa: 'abc' is not allowed (must be a number > 0)",
        ),
        (
            "stacking:\n  min_inliers: 6.5\n",
            "stacking.min_inliers: 6.5 is not allowed (must be a whole number >= 3)",
        ),
        ("watch:\n  recursive: maybe\n", "watch.recursive: 'maybe' is not allowed (must be true"),
        (
            "http:\n  token: 12345\n",
            "http.token: 12345 is not allowed (must be a string; put it in quotes)",
        ),
        ("watch:\n  path: 5\n", "watch.path: 5 is not allowed (must be a path)"),
    ],
    ids=[
        "section-string",
        "section-bool",
        "section-list",
        "list",
        "float",
        "int",
        "bool",
        "str",
        "path",
    ],
)
def test_wrong_type(tmp_path: Path, text: str, expected: str) -> None:
    assert f"subwatch.yaml: {expected}" in problems_of(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("stacking:\n  kappa: -1\n", "stacking.kappa: -1 is not allowed (must be > 0)"),
        ("stacking:\n  kappa: 0\n", "stacking.kappa: 0 is not allowed (must be > 0)"),
        (
            "deconvolution:\n  max_iterations: 501\n",
            "deconvolution.max_iterations: 501 is not allowed (must be >= 1 and <= 500)",
        ),
        (
            "previews:\n  stretch_midtone: 1.0\n",
            "previews.stretch_midtone: 1.0 is not allowed (must be > 0 and < 1)",
        ),
        ("frames:\n  max_dimension: 8\n", "frames.max_dimension: 8 is not allowed (must be >= 16)"),
        (
            "denoise:\n  strength: 1.5\n",
            "denoise.strength: 1.5 is not allowed (must be >= 0 and <= 1)",
        ),
        ("watch:\n  poll_seconds: .inf\n", "watch.poll_seconds: inf is not allowed (must be a fin"),
        ("stacking:\n  kappa: .nan\n", "stacking.kappa: nan is not allowed (must be a finite"),
        (
            "deconvolution:\n  psf_size: 24\n",
            "deconvolution.psf_size: 24 is not allowed (must be odd)",
        ),
        (
            "watch:\n  settle_seconds: 30\n  incomplete_timeout_seconds: 10\n",
            "watch.incomplete_timeout_seconds: 10.0 is not allowed "
            "(must be >= watch.settle_seconds = 30)",
        ),
    ],
    ids=[
        "negative",
        "zero",
        "above-max",
        "open-interval",
        "min",
        "closed-interval",
        "inf",
        "nan",
        "even-psf",
        "timeout-below-settle",
    ],
)
def test_out_of_range(tmp_path: Path, text: str, expected: str) -> None:
    assert f"subwatch.yaml: {expected}" in problems_of(tmp_path, text)


def test_bad_choice(tmp_path: Path) -> None:
    message = problems_of(tmp_path, "stacking:\n  rejection: sigma\n")
    assert message == (
        "subwatch.yaml: stacking.rejection: 'sigma' is not allowed "
        "(allowed: 'kappa-sigma', 'none'), at line 2"
    )


def test_bad_choice_in_a_list(tmp_path: Path) -> None:
    message = problems_of(tmp_path, "previews:\n  products:\n    - preview\n    - pretty\n")
    assert (
        "previews.products[1]: 'pretty' is not allowed "
        "(allowed: 'preview', 'denoised', 'deconvolved'), at line 4"
    ) in message


def test_bad_log_level_lists_levels(tmp_path: Path) -> None:
    message = problems_of(tmp_path, "logging:\n  level: verbose\n")
    assert "logging.level: 'VERBOSE' is not allowed" in message
    assert "'DEBUG', 'INFO', 'WARNING', 'ERROR'" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("previews:\n  products: [preview, preview]\n", "each product may be listed once"),
        ("watch:\n  include: []\n", "watch.include: [] is not allowed (must have at least 1"),
        ("watch:\n  include: ['raw/*.fits']\n", "'raw/*.fits' is not allowed (patterns match"),
        ("watch:\n  ignore: ['']\n", "watch.ignore: '' is not allowed (patterns must not be"),
        ("calibration:\n  path: ''\n", "calibration.path: '' is not allowed (must be a non-empty"),
        ("http:\n  token: ''\n", "http.token: '' is not allowed (must not be empty"),
    ],
    ids=["duplicate-product", "no-include", "slash", "empty-pattern", "empty-path", "empty-token"],
)
def test_other_value_checks(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in problems_of(tmp_path, text)


@pytest.mark.parametrize(
    ("listen", "reason"),
    [
        ("localhost", "the port is missing"),
        ("8750", "the port is missing"),
        (":8750", "the host is missing"),
        ("localhost:0", "the port must be 1..65535"),
        ("localhost:65536", "the port must be 1..65535"),
        ("localhost:http", "the port must be 1..65535"),
        ("::1:8750", "put an IPv6 address in brackets"),
        ("[::1]", "an IPv6 address in brackets needs ':PORT' after"),
        ("[nope]:8750", "'nope' is not an IPv6 address"),
        ("my host:8750", "'my host' is not a host name or address"),
    ],
)
def test_bad_http_listen(tmp_path: Path, listen: str, reason: str) -> None:
    message = problems_of(tmp_path, f"http:\n  listen: '{listen}'\n")
    assert message.startswith(f"subwatch.yaml: http.listen: '{listen}' is not allowed ({reason}")
    assert "must be HOST:PORT" in message
    with pytest.raises(ValueError, match="HOST:PORT"):
        split_listen(listen)


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:8750", "127.0.0.1", 8750),
        ("0.0.0.0:1", "0.0.0.0", 1),
        ("localhost:65535", "localhost", 65535),
        ("scope.local:80", "scope.local", 80),
        ("[::1]:8750", "::1", 8750),
        ("[::]:8750", "::", 8750),
    ],
)
def test_good_http_listen(listen: str, host: str, port: int) -> None:
    assert split_listen(listen) == (host, port)
    cfg = apply_overrides(Config(), http=listen)
    assert (cfg.http.listen, cfg.http.host, cfg.http.port) == (listen, host, port)


@pytest.mark.parametrize(("tile", "overlap"), [(512, 256), (512, 300), (64, 32)])
def test_overlap_must_be_below_half_a_tile(tmp_path: Path, tile: int, overlap: int) -> None:
    message = problems_of(tmp_path, f"denoise:\n  tile: {tile}\n  overlap: {overlap}\n")
    assert message == (
        f"subwatch.yaml: denoise.overlap: {overlap} is not allowed "
        f"(must be < tile // 2 = {tile // 2}), at line 3"
    )


def test_overlap_just_below_half_a_tile_is_fine(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "denoise:\n  tile: 64\n  overlap: 31\n"))
    assert cfg.denoise.overlap == 31


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    message = problems_of(tmp_path, "watch:\n  path: /data\n   recursive: true\n")
    assert message.startswith("subwatch.yaml: invalid YAML at line 3, column ")
    assert "mapping values are not allowed here" in message


def test_unclosed_bracket_is_a_syntax_error(tmp_path: Path) -> None:
    message = problems_of(tmp_path, "watch:\n  include: [a, b\n")
    assert "subwatch.yaml: invalid YAML at line" in message


@pytest.mark.parametrize(
    ("text", "shown"),
    [("- watch\n- stacking\n", '["watch", "stacking"]'), ("just words\n", "'just words'")],
    ids=["list", "scalar"],
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, shown: str) -> None:
    message = problems_of(tmp_path, text)
    assert message.startswith("subwatch.yaml: the top level must be a mapping of sections")
    assert message.endswith(f"got {shown}")


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(info.value) == f"{missing}: config file not found"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "subwatch.yaml"
    path.write_bytes(b"watch:\n  path: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    message = problems_of(tmp_path, "stacking:\n  kappa: 2\n  kappa: 4\n")
    assert message == "subwatch.yaml: stacking.kappa: duplicate key (also at line 2), at line 3"


def test_all_problems_are_listed_in_file_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        logging:
          level: loud
        stacking:
          kappa: -1
          rejection: sigma
        watch:
          pathh: /data
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert str(info.value) == "\n".join(problems)
    assert [p.split(":")[1].strip() for p in problems] == [
        "logging.level",
        "stacking.kappa",
        "stacking.rejection",
        "watch.pathh",
    ]
    assert all(p.startswith(f"{path}: ") for p in problems)


def test_format_validation_error_directly() -> None:
    with pytest.raises(ValidationError) as info:
        Config.model_validate({"stacking": {"kappa": -1, "interpolation": "nearest"}})
    text = format_validation_error(info.value, "my.yaml")
    assert text.splitlines() == [
        "my.yaml: stacking.interpolation: 'nearest' is not allowed "
        "(allowed: 'lanczos', 'cubic', 'linear')",
        "my.yaml: stacking.kappa: -1 is not allowed (must be > 0)",
    ]


def test_assignment_is_validated() -> None:
    cfg = Config()
    with pytest.raises(ValidationError):
        cfg.stacking.kappa = -1
    with pytest.raises(ValidationError):
        cfg.stacking.kapa = 2  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    conf_dir = tmp_path / "etc" / "subwatch"
    write(
        conf_dir,
        """
        watch:
          path: captures
        output:
          path: ../out
        calibration:
          path: ~/library
        denoise:
          model: /opt/models/denoise.onnx
        """,
    )
    # Load through a relative path from elsewhere: the file's directory is what counts.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(Path("..") / "etc" / "subwatch" / "subwatch.yaml")
    assert cfg.watch.path == conf_dir / "captures"
    assert cfg.output.path == tmp_path / "etc" / "out"
    assert cfg.calibration.path == home / "library"
    assert cfg.denoise.model == Path("/opt/models/denoise.onnx")


def test_defaults_not_written_in_the_file_stay_as_they_are(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "stacking:\n  kappa: 2\n"))
    assert cfg.output.path == Path("subwatch-out")


# --------------------------------------------------------------------------------------------
# Command-line overrides
# --------------------------------------------------------------------------------------------


def test_flags_override_the_file(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """
            watch:
              path: /from/file
              mode: polling
            output:
              path: /out/file
            calibration:
              path: /cal/file
            http:
              listen: 127.0.0.1:1234
              token: t
            """,
        )
    )
    new = apply_overrides(
        cfg,
        watch=Path("/flag/watch"),
        output=Path("/flag/out"),
        calibration=Path("/flag/cal"),
        http="0.0.0.0:8750",
    )
    assert new.watch.path == Path("/flag/watch")
    assert new.output.path == Path("/flag/out")
    assert new.calibration.path == Path("/flag/cal")
    assert new.http.listen == "0.0.0.0:8750"
    # Everything else comes from the file, and the original is untouched.
    assert new.watch.mode == "polling"
    assert new.http.token == "t"
    assert cfg.watch.path == Path("/from/file")
    assert cfg.http.listen == "127.0.0.1:1234"
    assert new is not cfg


def test_no_flags_change_nothing() -> None:
    cfg = Config()
    assert apply_overrides(cfg) == cfg


def test_flag_paths_are_relative_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = apply_overrides(Config(), watch=Path("caps"), output="~/out")  # type: ignore[arg-type]
    assert cfg.watch.path == tmp_path / "caps"
    assert cfg.output.path == tmp_path / "home" / "out"


def test_bad_http_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), http="localhost")
    assert str(info.value) == (
        "command line: --http: 'localhost' is not allowed (the port is missing; "
        "must be HOST:PORT such as 127.0.0.1:8750, 0.0.0.0:8750 or [::1]:8750)"
    )
