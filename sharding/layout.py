"""Where each file of a build lives inside OUTPUT (the one place that knows these names)."""

PLAN = ("_build", "plan.json.gz")
MANIFEST = ("manifest.json",)


def shard_tar(split: str, name: str) -> tuple[str, str]:
    return split, f"{name}.tar"


def shard_index(split: str, name: str) -> tuple[str, str]:
    return split, f"{name}.idx"


def shard_stats(split: str, name: str) -> tuple[str, str, str, str]:
    """Written last for a shard: its presence is what marks the shard as done."""
    return "_build", "stats", split, f"{name}.json"
