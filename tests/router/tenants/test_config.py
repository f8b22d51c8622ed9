"""Tenant configuration: a complete file is read; a bad one is refused at start with a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvroute.router.cli import main
from kvroute.router.config import ConfigError, build_config
from kvroute.router.tenants.identity import UnknownClient, identify

GOOD = """
port = 0
tenant_header = "X-Tenant"

[classes.gold]
priority = 3
ttft_slo_s = 0.5
max_queue_wait_s = 2

[classes.batch]
max_queue_wait_s = 120

[tenants.chat]
class = "gold"
api_keys = ["sk-chat-1", "sk-chat-2"]
weight = 2
max_concurrent = 64
tokens_per_s = 50000
burst_tokens = 200000

[tenants.docs]
class = "batch"
api_keys = ["sk-docs"]
"""


def test_a_complete_tenants_file_is_read(tmp_path: Path) -> None:
    p = tmp_path / "kvroute.toml"
    p.write_text(GOOD)
    cfg = build_config({"config": str(p)}, environ={})
    table = cfg.tenant_table()
    assert cfg.admission_enabled and cfg.tenant_header == "X-Tenant"
    assert table.classes["gold"].priority == 3 and table.classes["gold"].ttft_slo_s == 0.5
    assert table.classes["batch"].max_queue_wait_s == 120 and table.classes["batch"].priority == 0  # merged
    assert table.by_key["sk-chat-2"].name == "chat" and table.tenants["chat"].bucket_tokens == 200000
    assert identify(table, authorization="Bearer sk-docs").tenant.name == "docs"
    assert identify(table, authorization=None, tenant_header_value="chat").sla_class.name == "gold"
    assert identify(table, authorization="Bearer nope").tenant.name == "default"
    with pytest.raises(UnknownClient):
        identify(table, authorization="Bearer nope", require_api_key=True)


@pytest.mark.parametrize(
    "toml, message",
    [
        ('[tenants.chat]\nclass = "gold"\n', "tenant 'chat': unknown class 'gold'"),
        ("[tenants.chat]\nweight = 0\n", "tenant 'chat': weight must be a number > 0"),
        ("[tenants.chat]\nmax_concurrent = -1\n", "tenant 'chat': max_concurrent must be an integer >= 0"),
        ("[tenants.chat]\nrate = 5\n", "tenant 'chat': unknown field(s) ['rate']"),
        (
            '[tenants.a]\napi_keys = ["k"]\n[tenants.b]\napi_keys = ["k"]\n',
            "tenants 'a' and 'b' share an api key",
        ),
        ("[classes.fast]\nttft_slo_s = -1\n", "class 'fast': ttft_slo_s must be a number >= 0"),
        ('[classes.fast]\npriority = "high"\n', "class 'fast': priority must be an integer"),
        ('tenants = "chat"\n', "tenants: expected a JSON object of tables"),
    ],
)
def test_bad_tenant_config_is_refused_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, message: str
) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError) as info:
        build_config({"config": str(p)}, environ={})
    assert message in str(info.value)
    assert main(["serve", "--config", str(p), "--port", "0"]) == 2  # the command refuses to start
    err = capsys.readouterr().err
    assert err.startswith("kvroute serve: ") and message in err and "Traceback" not in err
