"""memvisor: a memory operating system for LLM applications.

    from memvisor import Memory
    memory = Memory()                      # ~/.memvisor, or $MEMVISOR_HOME
    memory.add("Ana moved to Lyon in March", namespace="app", user="ana")
    print(memory.context("Where does Ana live?", namespace="app", budget_tokens=256).text)
"""
from memvisor.api.memory import Memory
from memvisor.errors import (InvalidInput, KeyConflict, MalformedFile, MemvisorError, ModelUnavailable,
                             NotFound, UnknownMemory, UnknownNamespace)
from memvisor.types import Citation, Context, IngestReport, MemoryItem, ScoreExplanation, SearchHit

__version__ = "0.1.0"
__all__ = ["Memory", "MemoryItem", "SearchHit", "ScoreExplanation", "Context", "Citation", "IngestReport",
           "MemvisorError", "InvalidInput", "KeyConflict", "MalformedFile", "NotFound", "UnknownMemory",
           "UnknownNamespace", "ModelUnavailable"]
