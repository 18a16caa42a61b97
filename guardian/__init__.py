"""Guardian-Loop: look inside a transformer safety judge."""

from guardian.runtime import limit_heap_retention

limit_heap_retention()  # freed tensor memory goes back to the system (see guardian/runtime.py)

from guardian.judge import Judge, JudgeError  # noqa: E402
from guardian.loading import load_bundled_judges, load_judge  # noqa: E402
from guardian.scoring import Scores, Verdict, score_prompts, verdict  # noqa: E402

__all__ = ["Judge", "JudgeError", "Scores", "Verdict", "load_bundled_judges", "load_judge", "score_prompts", "verdict"]
