#!/usr/bin/env python3
"""Train trtconv's reference models (normally done on first use by ``ensure_reference_model``).

    python scripts/train_reference_models.py                    # fill the cache, all models
    python scripts/train_reference_models.py llama-ref --out DIR    # train into DIR/llama-ref
    python scripts/train_reference_models.py --check-reproducible   # train each twice, compare bytes
    python scripts/train_reference_models.py llama-ref --ship       # regenerate trtconv/data/reference/llama-ref

``--ship`` trains into the shipped folder (the bytes every machine then uses, see
``SHIPPED_MODELS`` in trtconv/data/reference_models.py) and prints the sha256 pins to paste there.
Shipping another model adds about 7 MB to the package.

The training code itself lives in ``trtconv/data/reference_models.py`` so the installed package can
train on first use; this script is a thin command line around it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

try:
    import trtconv  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trtconv.data.packs import file_sha256
from trtconv.data.reference_models import (REFERENCE_MODELS, SHIPPED_DIR, TRAINING_RECORD, ensure_reference_model, get_spec,
                                           train_reference_model)

# The files of a trained folder that are shipped (save_pretrained's, the tokenizer's, the training record).
SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 TRAINING_RECORD)


def ship(name: str) -> None:
    """Train into a temporary folder, replace trtconv/data/reference/<name> with its shipped files, print the pins."""
    import shutil

    with tempfile.TemporaryDirectory(prefix="trtconv-ship-") as tmp:
        train_reference_model(get_spec(name), Path(tmp))
        folder = SHIPPED_DIR / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for file in SHIPPED_FILES:
            shutil.copyfile(Path(tmp) / file, folder / file)
    print(f'    "{name}": {{')
    for file in SHIPPED_FILES:
        print(f'        "{file}": "{file_sha256(folder / file)}",')
    print("    },")


def check_reproducible(name: str) -> bool:
    """Train twice into fresh folders; the safetensors must be byte-identical."""
    digests = []
    with tempfile.TemporaryDirectory(prefix="trtconv-repro-") as tmp:
        for attempt in (1, 2):
            out = Path(tmp) / f"{name}-{attempt}"
            record = train_reference_model(get_spec(name), out)
            digests.append(file_sha256(out / "model.safetensors"))
            print(f"{name} run {attempt}: model.safetensors sha256 {digests[-1]}, {record['wall_time_s']} s, final loss {record['final_loss']}")
    same = digests[0] == digests[1]
    print(f"{name}: {'byte-identical' if same else 'DIFFERENT'}")
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=sorted(REFERENCE_MODELS), help="reference models (default: all)")
    parser.add_argument("--out", type=Path, help="train into OUT/<name> (no cache, overwrites)")
    parser.add_argument("--cache-dir", type=Path, help="cache root (default: $TRTCONV_CACHE or the user cache dir)")
    parser.add_argument("--check-reproducible", action="store_true", help="train each twice and compare model.safetensors")
    parser.add_argument("--ship", action="store_true", help="train into trtconv/data/reference/<name> and print its sha256 pins")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ok = True
    for name in args.names:
        if args.ship:
            ship(name)
        elif args.check_reproducible:
            ok &= check_reproducible(name)
        elif args.out:
            train_reference_model(get_spec(name), args.out / name)
        else:
            print(ensure_reference_model(name, args.cache_dir))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
