"""A tiny hand-made LoCoMo conversation whose right answers are known (shared by the bench tests)."""
from __future__ import annotations

import copy

CANARY = "CANARY-7f3a"  # planted in every field a system must never read

CONVERSATION = {
    "sample_id": "tiny-1",
    "conversation": {
        "speaker_a": "Ana",
        "speaker_b": "Ben",
        "session_2_date_time": "3:00 pm on 9 May, 2023",
        "session_2": [
            {"speaker": "Ben", "dia_id": "D2:1", "text": "My violin recital went well on Saturday."},
            {"speaker": "Ana", "dia_id": "D2:2", "text": "Congrats! I adopted a greyhound named Pixel."},
            {"speaker": "Ben", "dia_id": "D2:3", "text": "Look at this.", "blip_caption": "a photo of a red kite"},
        ],
        "session_1_date_time": "1:56 pm on 8 May, 2023",
        "session_1": [
            {"speaker": "Ana", "dia_id": "D1:1", "text": "Hi Ben, I started pottery classes in Lisbon."},
            {"speaker": "Ben", "dia_id": "D1:2", "text": "Nice. I am learning the violin."},
            {"speaker": "Ana", "dia_id": "D1:3", "text": "My sister Clara lives in Porto."},
        ],
        "session_3_date_time": "no session has this number",  # a date key without a session: ignored
    },
    "qa": [
        {"question": "Where does Ana take pottery classes?", "answer": "Lisbon " + CANARY,
         "evidence": ["D1:1"], "category": 4},
        {"question": "What instrument does Ben play?", "answer": "violin",
         "evidence": ["D1:2", "D2:1"], "category": 1},
        {"question": "What is the name of Ana's dog?", "answer": "Pixel",
         "evidence": ["D2:2; D1:3"], "category": 2},                      # two ids in one string
        {"question": "Where does Clara live?", "answer": 2023,            # an integer answer
         "evidence": ["", "D9:99", None, "D1:3"], "category": 3},           # empty, unknown, null
        {"question": "What did Ben share?", "answer": "a kite", "evidence": [], "category": 3},
        {"question": "What did Ana say about her cat?", "adversarial_answer": "Pixel " + CANARY,
         "evidence": ["D2:2"], "category": 5},
    ],
    "observation": {"session_1_observation": {"Ana": [[CANARY, "D1:1"]]}},
    "session_summary": {"session_1_summary": CANARY},
    "event_summary": {"events_session_1": {"Ana": [CANARY], "date": "8 May, 2023"}},
}


def conversation() -> dict:
    return copy.deepcopy(CONVERSATION)
