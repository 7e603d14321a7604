"""Ray Data's running operators, fed to `caslie_core.enrichment.stall.StallWatch` once a second from the executor's
own loop (an `ExecutionCallback` in the driver): a stalled plane says where its rows wait and why."""

from __future__ import annotations

import logging
import time

from ray.data._internal.execution.execution_callback import ExecutionCallback

from caslie_core.enrichment.stall import OpView, StallWatch

log = logging.getLogger("caslie")  # the jobs' logger (`common.log`; common imports this module)


def _views(executor) -> list[OpView]:
    from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator
    from ray.data._internal.execution.streaming_executor_state import format_op_state_summary

    out = []
    for op, state in executor._topology.items():  # Ray Data's internals: read defensively (see `on_execution_step`)
        if not op.input_dependencies:  # the input buffer, not an operator
            continue
        m = op.metrics
        out.append(
            OpView(
                name=op.name,
                rows_in=m.rows_task_outputs_generated if not out else m.num_row_inputs_received,
                rows_out=m.row_outputs_taken,
                queued_blocks=state.total_enqueued_input_blocks(),
                model_pool=isinstance(op, ActorPoolMapOperator),
                detail=format_op_state_summary(state, executor._resource_manager),
            )
        )
    return out


def stall_callback(after_s: float) -> type[ExecutionCallback]:
    """A callback class (Ray Data instantiates it per execution) that warns after `after_s` seconds stalled."""

    class Stall(ExecutionCallback):
        caslie = True  # ours: replaced, not added again, by the next job in this process

        def __init__(self) -> None:
            self.watch, self.next = StallWatch(after_s, log.warning), 0.0

        def on_execution_step(self, executor) -> None:
            if time.monotonic() < self.next:
                return
            self.next = time.monotonic() + 1.0
            try:
                self.watch.see(_views(executor))
            except Exception as e:  # noqa: BLE001 - a progress aid never fails the job; Ray's internals may move
                self.next = float("inf")
                log.debug(f"[enrich] stall watch off: {type(e).__name__}: {e}")

    return Stall
