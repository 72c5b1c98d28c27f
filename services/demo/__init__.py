"""The demo: the four Zhoushan stories of DOMAIN.md replayed against a running needle (``needle demo``)."""
from .results import DemoResult, Hop, StoryResult, trail
from .stories import run_stories

__all__ = ["DemoResult", "Hop", "StoryResult", "run_stories", "trail"]
