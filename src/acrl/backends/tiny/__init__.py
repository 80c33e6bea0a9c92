"""The embedded world's own models, small PyTorch transformers built from a config (no downloads): the captioner
(:mod:`.captioner`, a vision-language model) and the trainable reasoner (:mod:`.reasoner`, text only), over the
pieces they share (:mod:`.nn`: blocks, one sampler, one teacher-forced log-prob function, the checkpoint format)."""

from acrl.backends.tiny.captioner import TinyCaptioner, TinyVLM, WordTokenizer, images_to_tensor, world_tokenizer
from acrl.backends.tiny.reasoner import ReasonerTokenizer, TinyLM, TinyReasoner, world_reasoner_tokenizer

__all__ = ["ReasonerTokenizer", "TinyCaptioner", "TinyLM", "TinyReasoner", "TinyVLM", "WordTokenizer",
           "images_to_tensor", "world_reasoner_tokenizer", "world_tokenizer"]
