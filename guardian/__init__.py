"""Guardian-Loop: look inside a transformer safety judge."""

from guardian.judge import Judge, JudgeError
from guardian.loading import load_bundled_judges, load_judge
from guardian.scoring import Scores, Verdict, score_prompts, verdict

__all__ = ["Judge", "JudgeError", "Scores", "Verdict", "load_bundled_judges", "load_judge", "score_prompts", "verdict"]
