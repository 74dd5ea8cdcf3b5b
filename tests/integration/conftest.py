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

    def start(plugin_config, upstream, encode_port=None):
        listen, admin = harness.free_port(), harness.free_port()
        cfg = harness.render_config(plugin_config, upstream.port, listen, admin, wasm, encode_port)
        env = harness.Envoy(cfg, tmp_path_factory.mktemp("envoy"), admin, listen)
        started.append(env)
        return env.wait_ready()

    yield start
    for env in started:
        env.stop()
