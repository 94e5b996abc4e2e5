"""`qtarget profile`: the prior profile of a model on a sample of its user's demonstrations.

    profile = profile_examples(model, examples, pad_token_id=tok.pad_token_id)   # compute.py: per token
    summary = summarize(profile, tok)                                            # summary.py: profile.json
    advice = advise(summary)                                                     # advice.py: sourced findings
"""
from qtarget.profile.advice import FINDINGS, advise, lab_command, place
from qtarget.profile.compute import TokenProfile, profile_examples
from qtarget.profile.summary import summarize

__all__ = ["FINDINGS", "advise", "lab_command", "place", "TokenProfile", "profile_examples", "summarize"]
