"""Preference rows with a signal a tiny reward model learns: chosen answers end with a thank-you."""

from __future__ import annotations

import pandas as pd


GOOD = "Thank you for your help!"
BAD = "That answer is worse."
BODIES = ("The answer is short and clear.", "It is blue and cold.", "A computer runs programs.", "The sun rises.")
TOPICS = ("the sea", "a computer", "the weather", "numbers", "the sun", "cats and dogs", "a week")


def synthetic_rows(n_prompts: int = 64) -> pd.DataFrame:
    """Chosen answers end with a thank-you, rejected ones do not: a signal a tiny model learns.

    Prompts i % 4 == 0 are judged by three annotators who agree, i % 4 == 2 by three who
    split 2:1; every 8th prompt also has a tie and every 8th (offset 4) a both-bad row.
    """
    rows = []
    for i in range(n_prompts):
        prompt = [{"role": "user", "content": f"Question {i}: can you explain {TOPICS[i % len(TOPICS)]}?"}]
        body = BODIES[i % len(BODIES)]
        good, bad = f"{body} {GOOD}", f"{body} {BAD}"
        item = f"item-{i}"
        votes = (
            [(good, bad)] * 3
            if i % 4 == 0
            else [(good, bad), (good, bad), (bad, good)]
            if i % 4 == 2
            else [(good, bad)]
        )
        rows += [dict(prompt=prompt, chosen=c, rejected=r, label="preference", item_id=item) for c, r in votes]
        if i % 8 == 1:
            rows.append(
                dict(prompt=prompt, chosen=good, rejected=f"{body} {GOOD} Sure.", label="tie", item_id=f"{item}-t")
            )
        if i % 8 == 5:
            rows.append(dict(prompt=prompt, chosen=bad, rejected=f"{body} No.", label="both_bad", item_id=f"{item}-b"))
    return pd.DataFrame(rows)
