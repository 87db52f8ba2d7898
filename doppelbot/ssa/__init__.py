"""SSA labelling (Sensibleness and Specificity Average): the owner labels blind reply cards.

``labels`` parses the owner's marks and computes the report; ``flow`` samples contexts,
generates the candidates, posts the cards and records the labels (SQL in ``store.ssa``).
"""
