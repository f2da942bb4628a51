"""How much of the cluster a scoring run takes: model replicas, the CPUs and GPU share each reserves, their threads,
and the rows per output file. Plain arithmetic over the cluster's figures (no Ray), so every rule is testable alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from raydefect.errors import ConfigError

if TYPE_CHECKING:
    from raydefect.config import ScoreConfig


@dataclass(frozen=True)
class ResourcePlan:
    """What a scoring run reserves: `actors` model replicas, each holding `actor_cpus` CPUs and `num_gpus` GPUs (a
    share of one when several replicas share it), `threads` intra-op threads per CPU replica (None: the engine's
    default), and `light`, the listing and finishing tasks that run at once (they reserve no CPU)."""

    actors: int
    actor_cpus: float
    num_gpus: float
    threads: int | None
    light: int

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus else "cpu"


def plan_resources(sc: ScoreConfig, gpus: float, cpus: float, nodes: int, cores: int) -> ResourcePlan:
    """The `ResourcePlan` for score settings `sc` on a cluster of `gpus`, `cpus` and `nodes` (the driver's node has
    `cores` cores); `ConfigError` when the replicas would leave no CPU to decode images."""
    actors, actor_cpus = resolve_actors(sc, gpus, cpus, nodes, cores)
    num_gpus = 1 if gpus >= actors else (gpus / actors if gpus else 0)
    threads = sc.model_threads or (None if num_gpus else max(1, cores // -(-actors // nodes)))
    check_cpus_left(actors, actor_cpus, cpus)
    return ResourcePlan(actors, actor_cpus, num_gpus, threads, int(cpus - actors * actor_cpus))


def file_rows(rows_per_file: int, batch_size: int) -> int:
    """Rows per output file: score.rows_per_file rounded down to whole model batches (when it holds one)."""
    return rows_per_file - rows_per_file % batch_size if rows_per_file >= batch_size else rows_per_file


def resolve_actors(
    sc: ScoreConfig, gpus: float, cpus: float, nodes: int = 1, cores: int | None = None
) -> tuple[int, float]:
    """(model replicas, CPUs each reserves) from score.model_actors / score.actor_cpus and the cluster: with GPUs
    `default_actors` and 1 CPU each; without, one replica per CPU (at most `CPU_ACTORS_PER_NODE` per node) that
    together reserve half of the CPUs."""
    if gpus > 0:
        actor_cpus = 1.0 if sc.actor_cpus is None else sc.actor_cpus
        return sc.model_actors or default_actors(gpus, cpus, actor_cpus, sc.actors_per_gpu), actor_cpus
    actors = sc.model_actors or default_actors(0, cpus, 0.0, 0, nodes, cores)
    if sc.actor_cpus is not None:
        return actors, sc.actor_cpus
    # at most half the CPUs, and one CPU always left to the other stages (a one-CPU machine: the actor reserves none)
    return actors, max(0.0, min(cpus / 2, cpus - 1)) / actors


#: Default CPU replicas per node: beyond this, replicas get more threads each instead (memory: one model per replica).
CPU_ACTORS_PER_NODE = 8


def default_actors(
    gpus: float, cpus: float, actor_cpus: float, per_gpu: int, nodes: int = 1, cores: int | None = None
) -> int:
    """Model replicas when score.model_actors is null. Without GPUs, one per CPU, at most `CPU_ACTORS_PER_NODE` per
    node, each on one thread: on 2 cores, two single-threaded replicas scored 256 px images at 0.91 of the bare
    forward where one two-threaded replica reached 0.72 -- whenever a decode or write task takes a core, both of its
    threads wait at every operation. With GPUs, `per_gpu` per GPU (they share it, so
    one computes while another's batch is (de)serialised: measured on an H200 with dinov3-b, 1, 2 and 4 replicas
    reached 0.67, 0.86 and 0.94 of the bare forward), fewer if they would hold more than half the CPUs that decode
    for them, never fewer than one per GPU; always the same number on every GPU, so that each takes 1/k of one."""
    if gpus <= 0:
        per_node = CPU_ACTORS_PER_NODE
        # one node is the driver's own (Ray has no other kind of driver): no more replicas than its cores (an embedded
        # Ray may be given more logical CPUs than cores, as the tests' 4 on 2)
        if nodes <= 1 and cores:
            per_node = min(per_node, cores)
        return max(1, min(int(cpus), per_node * max(1, nodes)))
    whole = max(1, int(gpus))
    return whole * max(1, min(per_gpu, int(cpus / 2 / actor_cpus) // whole))


def check_cpus_left(actors: int, actor_cpus: float, cpus: float) -> None:
    """The model actors hold their CPUs for the whole run: if they took every CPU, no decode task could ever start
    and Ray Data would wait forever (also with less than one CPU left: measured, a one-CPU Ray whose actor held half
    of it never finished)."""
    need = 1.0
    if cpus - actors * actor_cpus < need:
        raise ConfigError(
            f"score.model_actors={actors} x score.actor_cpus={actor_cpus:g} reserve {actors * actor_cpus:g} of the "
            f"cluster's {cpus:g} CPUs, leaving less than {need:g} to decode images: lower score.model_actors or "
            "score.actor_cpus, or add CPUs"
        )
