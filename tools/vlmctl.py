#!/usr/bin/env python3
"""vlmctl: change the vlm-budget plugin configuration of a running Envoy
without restarting it, through file-based LDS (envoy/xds/bootstrap.yaml).

  vlmctl.py show --lds envoy/xds/lds.yaml
  vlmctl.py set  --lds envoy/xds/lds.yaml policy=dynamic ttft_slo_ms=800
  vlmctl.py set  --lds envoy/xds/lds.yaml --unset encode_cluster

Values are JSON where they parse as JSON (numbers, true/false, objects),
strings otherwise. The file is replaced atomically, which is what Envoy's
file watcher reacts to; Envoy then drains the old listener and serves new
connections with the new configuration. The new configuration is checked by
the filter when Envoy applies it: a bad one is rejected by Envoy (see
`listener_manager.lds.update_rejected` on the admin port) and the old one
stays in force.
"""
import argparse
import json
import os
import pathlib
import sys
import tempfile

import yaml

WASM_FILTER = "envoy.filters.http.wasm"


def plugin_configs(lds: dict):
    """Yields (wasm `config` dict) for every vlm-budget filter in the listeners."""
    for listener in lds.get("resources", []):
        for chain in listener.get("filter_chains", []):
            for f in chain.get("filters", []):
                for hf in f.get("typed_config", {}).get("http_filters", []):
                    if hf.get("name") == WASM_FILTER:
                        yield hf["typed_config"]["config"]


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load(path: pathlib.Path) -> tuple[str, dict]:
    text = path.read_text()
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    return header, yaml.safe_load(text)


def write_atomically(path: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["show", "set"])
    ap.add_argument("--lds", required=True, type=pathlib.Path, help="the LDS file Envoy watches")
    ap.add_argument("--unset", action="append", default=[], help="remove a field (back to its default)")
    ap.add_argument("assignments", nargs="*", help="field=value")
    args = ap.parse_intermixed_args(argv)
    header, lds = load(args.lds)
    configs = list(plugin_configs(lds))
    if not configs:
        print(f"no {WASM_FILTER} filter in {args.lds}", file=sys.stderr)
        return 1
    for cfg in configs:
        plugin = json.loads(cfg["configuration"]["value"] or "{}")
        if args.command == "show":
            print(json.dumps(plugin, indent=2))
            continue
        for a in args.assignments:
            key, sep, value = a.partition("=")
            if not sep:
                print(f"expected field=value, got {a!r}", file=sys.stderr)
                return 2
            plugin[key] = parse_value(value)
        for key in args.unset:
            plugin.pop(key, None)
        cfg["configuration"]["value"] = json.dumps(plugin, indent=2) + "\n"
    if args.command == "set":
        write_atomically(args.lds, header + yaml.safe_dump(lds, sort_keys=False, width=100))
        print(f"updated {args.lds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
