from .engine import generate, generate_text
from .verify import target_probs, verify

__all__ = ["generate", "generate_text", "target_probs", "verify"]
