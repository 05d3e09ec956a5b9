"""LoRA file layouts: one table-driven parser (`parse`) and the name helpers binding uses."""

from .parse import ParsedLora, ParseError, parse, split_key

__all__ = ["ParseError", "ParsedLora", "parse", "split_key"]
