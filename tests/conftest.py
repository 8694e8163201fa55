import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory):
    """One `expertpager serve` of the demo model (25% cache, 4 may wait, its code LoRA adapter loaded as "code") for
    the test_serve* modules; its log must hold no traceback when it stops."""
    from serve_helpers import start_server, stop_server

    from expertpager.model.demo import demo_model_path

    server = start_server(tmp_path_factory.mktemp("serve") / "server.log", "--cache", "25%", "--max-queue", "4",
                          "--adapter", f"code={demo_model_path() / 'adapters' / 'code'}")
    yield server
    stop_server(server)
    assert "Traceback" not in server.log.read_text()
