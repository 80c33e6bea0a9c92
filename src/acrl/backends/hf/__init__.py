"""The Hugging Face backend: any image-text-to-text model as the captioner, a causal LM as the reasoner.

- ``captioner``: :class:`~acrl.backends.hf.captioner.HFCaptioner`, the ``Policy`` over the two passes below;
- ``sampler``: the one sampler (each prompt prefilled once, a decode loop over the shared KV cache);
- ``logprobs``: the one teacher-forced log-prob function (old, update and π_ref log-probs) and the distribution
  it and the sampler share;
- ``inputs``: what the model is fed (processor outputs batched, positions from the attention mask, the prompt
  prefill, the vision tower once per problem);
- ``loading``: device, dtype, processor, model, LoRA adapter, gradient checkpointing;
- ``checkpoint``: the saved captioner directory, π_ref's lineage, merged exports;
- ``reasoner`` / ``trainable``: a causal LM as the reasoner, and with its own LoRA adapter (co-training);
- ``tiny``: tiny random-weight builds of the supported VLM families (tests, benchmarks, ``acrl make-tiny``).
"""
