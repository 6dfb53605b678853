"""Model registry on disk. No torch: the worker reads it, the trainer writes it.

Layout under ``{CLV_DATA_DIR}/models``::

    {version}/head.onnx        scoring head (contract in its metadata)
    {version}/encoder.onnx     text encoder (optional)
    {version}/tokenizer.json   tokenizer for the encoder (optional, with the encoder)
    {version}/card.json        config, metrics on the hold-out, data window, created-at
    CHAMPION                   the served version (one line; replaced atomically)
    HISTORY.jsonl              every promotion / refusal, one JSON object a line
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

CHAMPION = "CHAMPION"


class Registry:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, version: str) -> Path:
        return self.root / version

    def versions(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "head.onnx").exists())

    def champion(self) -> str | None:
        f = self.root / CHAMPION
        try:
            v = f.read_text().strip()
        except FileNotFoundError:
            return None
        return v or None

    def card(self, version: str) -> dict:
        f = self.path(version) / "card.json"
        return json.loads(f.read_text()) if f.exists() else {}

    def register(self, src: Path, version: str, reason: str = "") -> Path:
        """Move a finished model folder (on the same filesystem) in as ``version``, atomically:
        a reader never sees a half-written model. Refuses to overwrite an existing version."""
        src, dst = Path(src), self.path(version)
        if not (src / "head.onnx").exists():
            raise FileNotFoundError(f"{src} has no head.onnx; export the model before registering it")
        if dst.exists():
            raise FileExistsError(f"model {version} is already registered under {self.root}; pick a new version")
        self.root.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        self.log("registered", version, reason)
        return dst

    def set_champion(self, version: str, reason: str = "") -> None:
        if not (self.path(version) / "head.onnx").exists():
            raise FileNotFoundError(f"no model {version} under {self.root}; run `clv train` first")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{CHAMPION}.{os.getpid()}"
        tmp.write_text(version + "\n")
        os.replace(tmp, self.root / CHAMPION)  # atomic: workers never read half a name
        self.log("promoted", version, reason)

    def log(self, action: str, version: str, reason: str = "", **extra) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        rec = {"at": time.time(), "action": action, "version": version, "reason": reason, **extra}
        with open(self.root / "HISTORY.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def history(self) -> list[dict]:
        f = self.root / "HISTORY.jsonl"
        if not f.exists():
            return []
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
