"""The responder: the core of ``doppelbot run`` (no telethon, no torch).

``policy`` decides who is answered and when the bot stays silent, ``debounce`` turns bursts into
one reply, ``context`` and ``delivery`` shape what the model sees and what is sent, and
``service.Responder`` runs the reply lifecycle through the ``ChatTransport`` Protocol of
``transport`` (implemented over Telethon in ``doppelbot/telegram/live.py``).
"""
