"""How the driver starts a stage that trains (00, 05): as one plain process, under torchrun (train.engine ddp),
or under accelerate launch with configs/accelerate/fsdp.yaml or zero3.yaml (fsdp, deepspeed); on one node or
on several, each node running --processes of them.

    python -m selfreward.launch --config runs/x/config.yaml --processes 8       # the launcher's words, one a line
    python -m selfreward.launch --config C --processes 8 --nnodes 2 --node-rank 1 --master-addr HOST --master-port P

It prints nothing when the stage runs as one plain process. The nodes meet at --master-addr:--master-port (the
node of rank 0, which holds the run's training rank 0): a static rendezvous, so rank 0 is always there.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from selfreward import dryrun
from selfreward.run.config import ConfigError, load_config

ACCELERATE_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
ACCELERATE_CONFIG = {"fsdp": "fsdp.yaml", "deepspeed": "zero3.yaml"}


@dataclass(frozen=True)
class Nodes:
    """The machines a run spans and this one's place among them."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


def launcher(engine: str, processes: int, nodes: Nodes = Nodes(), python: str = sys.executable) -> list[str]:
    """The words that start a training stage's script as `processes` processes on this node: [] for one plain
    process, torchrun for ddp, accelerate launch with the engine's config file for fsdp and deepspeed."""
    static = ["--master_addr", nodes.master_addr, "--master_port", str(nodes.master_port)]
    if engine == "ddp":
        if processes == 1 and nodes.nnodes == 1:
            return []
        where = ["--standalone"] if nodes.nnodes == 1 else ["--nnodes", str(nodes.nnodes)]
        if nodes.nnodes > 1:
            where += ["--node_rank", str(nodes.node_rank), *static]
        return [python, "-m", "torch.distributed.run", *where, "--nproc_per_node", str(processes)]
    config_file = ACCELERATE_CONFIGS / ACCELERATE_CONFIG[engine]
    words = [python, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    words += ["--num_processes", str(processes * nodes.nnodes), "--num_machines", str(nodes.nnodes)]
    if nodes.nnodes > 1:
        words += ["--machine_rank", str(nodes.node_rank), "--main_process_ip", nodes.master_addr]
        words += ["--main_process_port", str(nodes.master_port)]
    return words


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m selfreward.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's config.yaml (its train.engine)")
    parser.add_argument("--processes", type=int, default=1, help="training processes on each node (one per GPU)")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--master-addr", default="127.0.0.1")
    parser.add_argument("--master-port", type=int, default=29500)
    parser.add_argument("--dry-run", action="store_true", help="the dry run's engine: ddp where there is no GPU")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = dryrun.dry_engine(config) if args.dry_run else config.train.engine
    if engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        print("error: config key 'train.engine' is deepspeed, but deepspeed is not installed: pip install deepspeed",
              file=sys.stderr)  # fmt: skip
        return 2
    words = launcher(engine, args.processes, Nodes(args.nnodes, args.node_rank, args.master_addr, args.master_port))
    if words:
        print("\n".join(words))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
