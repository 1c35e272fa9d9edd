"""Dump, per LoCoMo dev question, the retriever's whole candidate list (each signal's rank) and, per
conversation, the turns with their token costs, for offline re-scoring and packing
(`scripts/simulate_packing.py`; the session-4 table in NOTES.md).

    python scripts/dump_candidates.py   # writes /tmp/memvisor-cands.json, homes under /tmp/memvisor-tune4

Reads questions and evidence only to write them next to the candidates; the system never sees them."""
import json
from pathlib import Path
from memvisor import Memory
from memvisor.models.tokenizer import default_tokenizer
from memvisor.text.formats import locomo_conversation
from memvisor.text.retrieve import named_speaker, terms
from memvisor.store.filters import Filters
tok = default_tokenizer()
data = json.loads(Path("../shared/data/locomo/locomo-dev.json").read_text())
out = {"convs": {}}
for sample in data:
    conv = locomo_conversation({"sample_id": sample["sample_id"], "conversation": sample["conversation"]})
    home = Path("/tmp/memvisor-tune4") / conv.id
    m = Memory(home)
    if "tune" not in m.store.namespaces():
        m.ingest(conv, namespace="tune")
    rows = m.store.db.execute("SELECT rid, text, metadata, session_id, position, valid_from, sources, speaker FROM items WHERE namespace='tune'").fetchall()
    turns = {}
    for r in rows:
        md = json.loads(r["metadata"])
        line = f"{md.get('speaker')}: {r['text']}"
        turns[r["rid"]] = dict(src=json.loads(r["sources"])[0], text=r["text"], speaker=md.get("speaker"), session=r["session_id"],
                               pos=r["position"], time=r["valid_from"], cost=tok.count("\n" + line), cost_ns=tok.count("\n" + r["text"]))
    qs = []
    ret = m.retriever
    ret.pool = 1000
    for q in sample["qa"]:
        f = Filters(namespace="tune")
        cands = ret.retrieve(m.store, m.embedder, q["question"], f, limit=2000)
        named = named_speaker(terms(q["question"]), m.store.speakers("tune"))
        qs.append(dict(q=q["question"], cat=q["category"], ev=q.get("evidence", []), named=named,
                       cands=[(c.row["rid"], c.bm25_rank, c.vector_rank, c.vector_similarity) for c in cands]))
    out["convs"][conv.id] = dict(turns=turns, qs=qs)
    m.close()
    print(conv.id, len(turns), len(qs), flush=True)
Path("/tmp/memvisor-cands.json").write_text(json.dumps(out))
