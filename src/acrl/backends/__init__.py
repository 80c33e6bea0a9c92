"""Backends behind the small protocols the trainer and evaluator use.

- ``Reasoner.complete(prompts) -> replies`` (``acrl.rollout.protocols.Reasoner``): ``world`` (deterministic, embedded
world).
- ``Clarifier.answer(images, questions) -> answers`` (``acrl.rollout.protocols.Clarifier``): the reference captioner.
- ``Policy`` (``acrl.rollout.protocols``): a trainable captioner: sample captions with token log-probs, recompute them
  with gradient, and expose the frozen reference (``tiny``: the embedded world's small PyTorch VLM).
"""
