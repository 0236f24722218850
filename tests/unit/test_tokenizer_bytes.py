"""The artifact's tokenizer files do not depend on HF_HUB_OFFLINE (transformers records the load-time
`local_files_only` in tokenizer_config.json; export.save_tokenizer writes it as an online load does)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _save(model: Path, out: Path, offline: str) -> dict[str, bytes]:
    code = ("import sys; from pathlib import Path; from trtconv.checkpoints.hf_model import load_tokenizer; "
            "from trtconv.stages.export import save_tokenizer; "
            "save_tokenizer(load_tokenizer(Path(sys.argv[1]), False), Path(sys.argv[2]))")
    env = {**os.environ, "HF_HUB_OFFLINE": offline}
    subprocess.run([sys.executable, "-c", code, str(model), str(out)], cwd=REPO, env=env, check=True, timeout=300)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_offline_and_online_write_the_same_tokenizer_bytes(tiny_llama, tmp_path):
    online = _save(tiny_llama, tmp_path / "online", "0")
    offline = _save(tiny_llama, tmp_path / "offline", "1")
    assert online == offline
    assert b'"local_files_only": true' not in offline["tokenizer_config.json"]
