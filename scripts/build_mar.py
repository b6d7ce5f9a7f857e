"""Build a TorchServe archive (model_store/<name>.mar) from handler/ and config/model-config.yaml.

The archive holds the handler and the llmserve package; the weights stay in the local model
directory, whose path is written into the archive's model-config.yaml as an absolute path.
Overrides make a variant of the same model, e.g. an int8 one to register beside the default:
    python scripts/build_mar.py --name llm-int8 --set quantization=int8
    python scripts/build_mar.py --name llm-small --batch-size 16 --set max_num_seqs=16
One archive serves both continuous and request-level batching (see handler/llm_handler.py).
--no-continuous-batching builds an archive for TorchServe's classic batching instead, the one
that scales to several workers per model in TorchServe 0.12 (request-level only):
    python scripts/build_mar.py --name llm-classic --no-continuous-batching --set batching=request_level
"""

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from llmserve.config import EngineConfig
from llmserve.tenants import Tenants

ROOT = Path(__file__).resolve().parent.parent


def render_config(args) -> dict:
    config = yaml.safe_load(args.config.read_text())
    handler = dict(config.get("handler") or {})
    for item in args.set:
        key, _, value = item.partition("=")
        handler[key] = yaml.safe_load(value)
    path = Path(handler.get("model_path", ""))
    handler["model_path"] = str(path if path.is_absolute() else (ROOT / path).resolve())
    engine_config = EngineConfig.from_dict(handler)   # fail here, not in a worker, on a bad key or value
    Tenants(config.get("tenants"))
    config["handler"] = handler
    for key, value in (("continuousBatching", args.continuous_batching), ("batchSize", args.batch_size),
                       ("maxBatchDelay", args.max_batch_delay)):
        if value is not None:
            config[key] = value
    if not config.get("continuousBatching") and engine_config.batching == "continuous":
        raise SystemExit("continuousBatching: false needs --set batching=request_level")
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="llm")
    parser.add_argument("--config", type=Path, default=ROOT / "config/model-config.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the handler: section")
    parser.add_argument("--continuous-batching", action=argparse.BooleanOptionalAction, default=None,
                        help="override the config's continuousBatching")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-batch-delay", type=int)
    parser.add_argument("--export-path", type=Path, default=ROOT / "model_store")
    args = parser.parse_args()

    stage = ROOT / "build" / f"mar-{args.name}"
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(ROOT / "handler" / "llmserve", stage / "extra" / "llmserve",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (stage / "model-config.yaml").write_text(yaml.safe_dump(render_config(args), sort_keys=False))
    args.export_path.mkdir(parents=True, exist_ok=True)
    subprocess.run([
        str(Path(sys.executable).parent / "torch-model-archiver"), "--model-name", args.name, "--version", "1.0",
        "--handler", str(ROOT / "handler" / "llm_handler.py"),
        "--extra-files", str(stage / "extra"),
        "--config-file", str(stage / "model-config.yaml"),
        "--export-path", str(args.export_path), "--force",
    ], check=True)
    print(args.export_path / f"{args.name}.mar")


if __name__ == "__main__":
    main()
