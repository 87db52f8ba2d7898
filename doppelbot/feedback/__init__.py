"""What the owner's reactions to the bot teach it: verdicts on drafts, reactions on sent
replies and takeover corrections (``capture``), and their export as training data
(``export``). The rows live in ``store.feedback``.
"""
