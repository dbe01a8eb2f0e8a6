"""What the runner plugs into Ray Data's executor (Ray is pinned, pyproject.toml; tests/pipeline/test_pools.py fails
if these hooks move):

- `BalancedActorAutoscaler` steers our model pools to the `PoolBalancer`'s targets (and feeds it Ray Data's
  per-operator costs for the warm-up). Ray Data 2.60 has no public hook for an actor autoscaler: `balanced_pools`
  swaps the factory its streaming executor calls, for the length of one run.
- `PoolsFirstBackpressure` holds back new tasks while a pool that has grown waits for its new actor's CPU. Ray
  hands a freed CPU to whatever was queued first; without this, a grown segmentation actor waited more than 30 s
  behind a stream of short clip tasks. Set through Ray Data's own `backpressure_policies.enabled` config.
"""

from __future__ import annotations

from ray.data._internal.actor_autoscaler import ActorPoolScalingRequest, DefaultActorAutoscaler
from ray.data._internal.execution import streaming_executor
from ray.data._internal.execution.backpressure_policy import (
    ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
    BackpressurePolicy,
    ConcurrencyCapBackpressurePolicy,
)
from ray.data._internal.execution.backpressure_policy.resource_budget_backpressure_policy import (
    ResourceBudgetBackpressurePolicy,
)

from pipeline.run.pools import WARMUP_ITEMS, Pool, PoolBalancer


def operator_group(name: str) -> str:
    """`MapBatches(probe+shot_cut)` -> `probe+shot_cut`: the stage group an operator runs."""
    return name[name.find("(") + 1:-1] if name.endswith(")") and "(" in name else name


class BalancedActorAutoscaler(DefaultActorAutoscaler):
    """Ray Data's default actor autoscaler, except that our pools go to the balancer's targets."""

    balancer: PoolBalancer | None = None

    def try_trigger_scaling(self):
        if self.balancer is not None:
            for op in self._topology:
                rows = op.metrics.rows_task_outputs_generated or 0
                seconds = op.metrics.block_generation_time or 0.0
                if rows >= WARMUP_ITEMS and seconds > 0:
                    self.balancer.op_costs[operator_group(op.name)] = seconds / rows
        super().try_trigger_scaling()

    def _derive_target_scaling_config(self, actor_pool, op, op_state):
        pool = self._our_pool(op)
        default = super()._derive_target_scaling_config(actor_pool, op, op_state)
        # At the end of its input, or with nothing received yet, Ray Data knows best (release / wait).
        if pool is None or default.force or op.metrics.num_inputs_received == 0:
            return default
        self.balancer.replan()
        current = actor_pool.current_size()
        if pool.target > current:
            if pool.placement:
                pool.placement.actors = current
            return ActorPoolScalingRequest.upscale(delta=pool.target - current, reason=pool.why)
        if pool.target < current:
            return ActorPoolScalingRequest.downscale(delta=pool.target - current, reason=pool.why)
        return ActorPoolScalingRequest.no_op(reason="at its balanced size")

    def _our_pool(self, op) -> Pool | None:
        if self.balancer is None:
            return None
        return self.balancer.pools.get(operator_group(op.name))


class PoolsFirstBackpressure(BackpressurePolicy):
    """No new task on a task operator while an actor pool that already runs has an actor waiting to start."""

    def can_add_input(self, op) -> bool:
        if op.get_autoscaling_actor_pools():
            return True
        for other in self._topology:
            for pool in other.get_autoscaling_actor_pools():
                if pool.num_pending_actors() > 0 and pool.num_running_actors() > 0:
                    return False
        return True


# Ray Data's default policies but one: "downstream capacity" held the last operator once its queued output
# exceeded twice what the driver had in flight. The driver takes each clip the moment it is ready and so never
# holds much: the policy stopped the sample stage with 27 clips queued in front of it while segmentation filled
# the object store. The object-store budget (ResourceBudget) still bounds what runs ahead.
POLICIES = [ConcurrencyCapBackpressurePolicy, ResourceBudgetBackpressurePolicy, PoolsFirstBackpressure]


def use_policies(context) -> None:
    context.set_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, POLICIES)


class balanced_pools:
    """While open, Ray Data executors started in this process scale our pools by `balancer`; the factory the
    streaming executor calls is put back on exit."""

    def __init__(self, balancer: PoolBalancer):
        self.balancer = balancer

    def __enter__(self) -> PoolBalancer:
        self._original = streaming_executor.create_actor_autoscaler
        balancer = self.balancer

        def create(topology, resource_manager, config):
            scaler = BalancedActorAutoscaler(topology, resource_manager, config=config)
            scaler.balancer = balancer
            return scaler

        streaming_executor.create_actor_autoscaler = create
        return balancer

    def __exit__(self, *exc) -> None:
        streaming_executor.create_actor_autoscaler = self._original
