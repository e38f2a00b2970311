"""Running ``train.stages`` (the spec side: launch/stages.py): one stage after another, each a
full run of its own spec over its range of global steps, joined through checkpoints.

- Stage ``i`` builds its run (model, SP attention, engine, scatter, batch builder) from its own
  spec and, unless it is the first stage of a fresh run, loads the newest checkpoint: at a stage
  boundary that is the previous stage's last step, which every stage saves. DCP reshards it into
  the new layout, exactly as ``--resume`` does, so an uninterrupted run and one stopped and
  resumed at any step take the same path.
- Global step, optimizer state and the LR schedule continue (the schedule is a function of the
  global step; trainer.py).
- Data across a boundary: the document stream continues where the previous stage stopped when
  the batching allows it (``window``: the same position in the seed's document order, cut at the
  new length; ``pack``: the same next document, the previous stage's leftover pieces dropped);
  otherwise (``decompose``, or a change of ``data.batching``) the new stage starts the seed's stream
  afresh. Either way it is a function of the boundary checkpoint alone, hence of the seed.
- ``--resume`` picks the stage holding the step after the newest complete checkpoint. The spec a
  checkpoint recorded is compared with the spec of the stage that saved it (train/rundir.py).
- Every metrics row carries ``stage`` (0-based).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

WINDOW_STATE = {"epoch", "cursor", "offset"}
PACK_STATE = {"epoch", "cursor", "carry"}


@dataclass(frozen=True)
class Stage:
    index: int
    first: int  # first global step of the stage (1-based)
    last: int  # last global step, inclusive
    previous: object = field(default=None, compare=False)  # the previous stage's Spec (None: first stage)


def stages_of(spec) -> list[Stage]:
    out, start = [], 0
    for i, stage in enumerate(spec.train.stages):
        out.append(Stage(i, start + 1, start + stage["steps"]))
        start += stage["steps"]
    return out


def _newest_step(output_dir) -> int:
    """The step of the newest complete checkpoint whose files are intact, as rank 0 sees it (every
    rank starts the same stage; resume skips the damaged ones the same way)."""
    import torch
    import torch.distributed as dist

    from seqshard.dist.resume import DamagedCheckpoint, complete_checkpoints, verify_checkpoint

    found = 0
    for path in complete_checkpoints(output_dir):
        try:
            verify_checkpoint(path)
        except DamagedCheckpoint:
            continue
        found = int(path.name.split("_")[-1])
        break
    step = torch.tensor([found])
    dist.broadcast(step, 0)
    return int(step.item())


def train_stages(spec, resume: bool, stop_after, train_fn) -> list[dict]:
    """Run the stages of ``spec`` with ``train_fn`` (trainer.train); returns every step's metrics."""
    import torch.distributed as dist

    from seqshard.dist.bootstrap import init_distributed

    from .logs import get_logger

    init_distributed(spec.train.collective_timeout_s)  # the stage specs are checked at this world size
    log = get_logger(dist.get_rank())
    specs = spec.stage_specs(dist.get_world_size())
    done = _newest_step(spec.train.output_dir) if resume else 0
    stop = stop_after or spec.train.steps
    history, first_run = [], True
    for stage, stage_spec in zip(stages_of(spec), specs):
        stage = replace(stage, previous=specs[stage.index - 1] if stage.index else None)
        if stage.last <= done:
            continue
        if stage.first > stop:
            break
        log.info("stage %d of %d: steps %d-%d", stage.index, len(specs), stage.first, stage.last)
        history += train_fn(stage_spec, resume=resume or not first_run, stop_after=min(stage.last, stop),
                            stage=stage)
        first_run = False
    return history


def load_data_state(builder, state: dict, stage: Stage | None):
    """Restore the batch builder from a checkpoint's trainer state; at ``stage``'s boundary, hand
    the previous stage's document stream over (module docstring)."""
    if stage is None or state["step"] >= stage.first:
        if stage is not None and state["step"] >= stage.last:
            raise RuntimeError(f"stage {stage.index} (steps {stage.first}-{stage.last}) resumed from a checkpoint "
                               f"of step {state['step']}, past its end")
        builder.load_state_dict(state["data"])
        return
    if state["step"] != stage.first - 1:
        raise RuntimeError(f"stage {stage.index} starts after step {stage.first - 1}, but the newest checkpoint "
                           f"that loads is step {state['step']}, of an earlier stage: move the newer ones that "
                           "do not load out of checkpoints/, then --resume continues in that step's stage")
    mine, theirs = set(builder.state_dict()), set(state["data"])
    if mine == theirs == WINDOW_STATE:
        builder.load_state_dict(state["data"])
    elif mine == theirs == PACK_STATE:
        builder.load_state_dict({**state["data"], "carry": []})


def resume_reference(spec, stage: Stage | None, checkpoint) -> dict:
    """The spec ``checkpoint`` should have recorded (train/rundir.py compares them): the running
    spec's, or at ``stage``'s boundary the previous stage's."""
    step = int(Path(checkpoint).name.split("_")[-1])
    if stage is not None and stage.previous is not None and step < stage.first:
        return stage.previous.to_dict()
    return spec.to_dict()
