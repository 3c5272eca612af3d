"""Rollout: sampling N answers per prompt. One interface (`RolloutEngine`), several engines: in-process Hugging
Face (`hf.HFEngine`), and the separate rollout service over HTTP (`client.ServiceEngine`).

The service, `ttrv serve`: `service` (HTTP routes, `serve`) over a serving engine (`serving`: vLLM, driven as a child
process by `vllm_process`, or the Hugging Face engine) and the weight `sync` agent. `supervisor` runs `ttrv serve` as
a child process (`ttrv run`, tests, benches); `jsonhttp` is how ttrv's processes talk to each other."""

from ttrv.rollout.base import RolloutEngine, Sample

__all__ = ["RolloutEngine", "Sample"]
