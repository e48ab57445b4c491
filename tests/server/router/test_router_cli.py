"""`attnserve router`'s flags, checked before anything starts, and how replicas get GPUs."""

from __future__ import annotations

import pytest

from server.router import cli as router_cli
from server.router.supervisor import RouterSettings, gpu_assignment


@pytest.mark.parametrize("flags, message", [
    (["--replica-name", "x"], "--replica-name: set by `attnserve router`"),
    (["--no-such-flag"], "the serve flags above are not valid"),
    (["--model", "/no/such/model.gguf"], "/no/such/model.gguf"),
])
def test_bad_worker_flags_end_the_command_before_anything_starts(
        flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert router_cli.main([*flags, "--router-command", "true"]) == 2
    assert message in capsys.readouterr().err


def test_router_flags_are_not_worker_flags() -> None:
    args, rest = router_cli.build_parser().parse_known_args(
        ["--host=0.0.0.0", "--policy", "round_robin", "--max-model-len", "512"])
    assert (args.host, args.policy) == ("0.0.0.0", "round_robin")
    assert rest == ["--max-model-len", "512"]


def test_no_replicas_needs_worker_urls() -> None:
    with pytest.raises(SystemExit):
        router_cli.main(["--replicas", "0", "--router-command", "true"])


def test_serve_flag_values_are_read_as_argparse_would() -> None:
    flags = ["--device", "cpu", "--api-key=k1", "--api-key", "k2"]
    assert router_cli._flag_value(flags, "--device") == "cpu"
    assert router_cli._flag_value(flags, "--api-key") == "k2"
    assert router_cli._flag_value(flags, "--model") is None


def test_one_gpu_per_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert gpu_assignment(2, None) == ["2", "5"]
    assert gpu_assignment(3, "cuda") == ["2", "5", "2"]  # more replicas than GPUs: shared
    assert gpu_assignment(2, "cpu") == [None, None]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_assignment(2, None) == [None, None]


def test_router_command_line() -> None:
    settings = RouterSettings(command=["router"], host="0.0.0.0", port=9000,
                              policy="round_robin", extra_args=["--cache-threshold", "0.5"])
    argv = settings.argv(["http://a:1", "http://b:2"], 29001)
    assert argv[:5] == ["router", "--host", "0.0.0.0", "--port", "9000"]
    assert argv[argv.index("--worker-urls") + 1:argv.index("--policy")] == [
        "http://a:1", "http://b:2"]
    assert argv[argv.index("--policy") + 1] == "round_robin"
    assert argv[argv.index("--prometheus-port") + 1] == "29001"
    assert argv[-2:] == ["--cache-threshold", "0.5"]
