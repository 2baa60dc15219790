"""Generation requests and their scores, as the training loop and `rlmesh eval` issue them: one routed call per
prompt (or one agent-loop episode group), the samples laid out as one batch in the object store, and the reward
role's scores of a batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlmesh.batch_stages import Layout, assemble_generations, reward_summary
from rlmesh.config import RlmeshConfig, SamplingConfig
from rlmesh.data import Batch, PromptRow
from rlmesh.mesh import Stored, StoredRows, run_stored, wait_all
from rlmesh.recovery import RoleCall
from rlmesh.roles.contracts import AgentLoopMesh, RolloutMesh, ScorerMesh
from rlmesh.roles.rollout.base import Sample, sampling_seed


@dataclass
class IssuedRollout:
    """One step's generation requests, one routed call per prompt (n samples each), issued ahead of the step that
    trains them, or that step's batch once assembled (or restored from a checkpoint). A step whose prompts did not
    all fit the async buffer has its first len(groups) prompts issued and the rest pending."""

    step: int
    prompts: list[PromptRow]
    n: int
    sampling: SamplingConfig
    groups: list[Any]  # the calls' futures, each resolving to a Stored[list[Sample], None]
    batch: StoredRows[Batch] | None = None

    @property
    def num_groups(self) -> int:
        """Groups issued: in flight, or finished and waiting."""
        if self.batch is None:
            return len(self.groups)
        return len(self.prompts) if self.prompts else len(self.batch) // self.n

    @property
    def pending(self) -> int:
        """Prompts drawn for the step and not yet issued."""
        return 0 if self.batch is not None else len(self.prompts) - len(self.groups)


class Sampler:
    """Sends prompts to the rollout engines (or the agent loops, which call the engines themselves) and scores the
    batches they come back as with the reward role. The loop trains on what it returns; `rlmesh eval` measures it."""

    def __init__(
        self,
        cfg: RlmeshConfig,
        rollout: RolloutMesh,
        reward: ScorerMesh,
        agent: AgentLoopMesh | None,
        pad_token_id: int,
    ) -> None:
        self.cfg, self.pad_token_id = cfg, pad_token_id
        self.rollout_mesh, self.reward_mesh, self.agent_mesh = rollout, reward, agent

    def generate(
        self, prompts: list[PromptRow], n: int, sampling: SamplingConfig, step: int, fixed_widths: bool = False
    ) -> StoredRows[Batch]:
        """One routed request per prompt; the engines batch them continuously. Token ids in, token ids out: the
        samples stay in the object store, and the store worker lays them out as one batch. Tensors are as wide as
        the longest prompt and response, or with `fixed_widths` as wide as the longest allowed
        (data.max_prompt_length, sampling.max_tokens)."""
        return self.assemble(self.issue(prompts, n, sampling, step), fixed_widths)

    def issue(self, prompts: list[PromptRow], n: int, sampling: SamplingConfig, step: int) -> IssuedRollout:
        """Send `step`'s requests; returns at once."""
        issued = IssuedRollout(step, prompts, n, sampling, [])
        self.top_up(issued, len(prompts))
        return issued

    def seed_base(self, sampling: SamplingConfig) -> int:
        """What request seeds derive from (with the step and the prompt): sampling.seed, else trainer.seed."""
        return sampling.seed if sampling.seed is not None else self.cfg.trainer.seed

    def top_up(self, issued: IssuedRollout, count: int) -> None:
        """Send the next `count` pending prompts' requests, each with its own seed (from the run's seed, the step and
        the prompt: the same samples whenever they are issued)."""
        sampling, start = issued.sampling, len(issued.groups)
        base = self.seed_base(sampling)
        generate = self.rollout_mesh.generate.in_store()
        episodes = self.agent_mesh.run_group.in_store() if self.agent_mesh else None
        for prompt in issued.prompts[start : start + count]:
            seed = sampling_seed(base, issued.step, prompt["index"])
            if episodes is not None:  # n multi-turn episodes, played by an agent loop
                issued.groups.append(episodes.choose(prompt, issued.n, sampling, seed))
            else:
                issued.groups.append(generate.choose(prompt["prompt_ids"], issued.n, sampling, seed))

    def assemble(self, issued: IssuedRollout, fixed_widths: bool = False) -> StoredRows[Batch]:
        """Wait for the issued requests and lay their samples out as one batch (in the store), once; prompts still
        pending are issued first (a checkpoint finishes every step drawn ahead)."""
        if issued.batch is not None:
            return issued.batch
        self.top_up(issued, issued.pending)
        prompts, step, sampling = issued.prompts, issued.step, issued.sampling
        groups: list[Stored[list[Sample], None]] = wait_all(issued.groups)
        per_prompt = {
            "data_source": [p["data_source"] for p in prompts],
            "ground_truth": [p["ground_truth"] for p in prompts],
            "extra_info": [p["extra_info"] for p in prompts],
            "uid": [f"{step}/{p['index']}" for p in prompts],
        }
        layout = Layout(
            pad_token_id=self.pad_token_id,
            prompt_length=self.cfg.data.max_prompt_length if fixed_widths else None,
            response_length=sampling.max_tokens if fixed_widths else None,
            temperature=sampling.temperature or 1.0,
        )
        samples = StoredRows.concat([group.rows for group in groups])
        sizes = [len(group.rows) for group in groups]  # n each, or more where an episode split into samples
        issued.batch = run_stored(assemble_generations, samples, per_prompt, sizes, layout).result().rows
        return issued.batch

    def score(self, batch: StoredRows[Batch]) -> RoleCall:
        """The reward role's fields stay in the store; its per-sample scores come back (reward_summary)."""
        reward = self.reward_mesh
        return stateless_call("reward", reward, lambda: reward.score.in_store(reward_summary).shard(batch))


def stateless_call(role: str, mesh: Any, issue: Callable[[], Any]) -> RoleCall:
    """A call to a role whose actors hold no training state: issued now, and repeated if its actors die."""
    return RoleCall(role, mesh, issue(), issue)
