import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import harness  # noqa: E402


@pytest.fixture(scope="session")
def wasm():
    if not harness.WASM.exists():
        pytest.fail(f"{harness.WASM} missing: run `make wasm`")
    return harness.WASM


@pytest.fixture(scope="module")
def upstream():
    rec = harness.Recorder()
    yield rec
    rec.close()


@pytest.fixture(scope="module")
def start_envoy(wasm, tmp_path_factory):
    """Factory: start_envoy(plugin_config, upstream) -> ready Envoy (stopped at module end)."""
    started = []

    def start(plugin_config, upstream, encode_port=None, mutate=None):
        """`upstream`: a Recorder or an Emulator (then its encode port is the default);
        `mutate(config)` may change the rendered Envoy configuration."""
        listen, admin = harness.free_port(), harness.free_port()
        if isinstance(upstream, harness.Emulator):
            pd_port, encode_port = upstream.pd_port, encode_port or upstream.encode_port
        else:
            pd_port = upstream.port
        cfg = harness.render_config(plugin_config, pd_port, listen, admin, wasm, encode_port)
        if mutate is not None:
            mutate(cfg)
        env = harness.Envoy(cfg, tmp_path_factory.mktemp("envoy"), admin, listen)
        started.append(env)
        return env.wait_ready()

    yield start
    for env in started:
        env.stop()


@pytest.fixture
def emulator(tmp_path):
    """A fresh emulated EPD cluster (encode + PD), 1 GPU each, real-time model."""
    started = []

    def start(*args):
        emu = harness.Emulator(tmp_path, *args)
        started.append(emu)
        return emu

    yield start
    for emu in started:
        emu.stop()
