"""One module per caching method: its config dataclass and its policy. `..registry` lists them."""
