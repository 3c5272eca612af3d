"""Rollout: sampling N answers per prompt. One interface (`RolloutEngine`), several engines: in-process Hugging
Face (`hf.HFEngine`), and the separate rollout service over HTTP (`client.ServiceEngine`) whose server runs vLLM or
the Hugging Face engine."""

from ttrv.rollout.base import RolloutEngine, Sample

__all__ = ["RolloutEngine", "Sample"]
