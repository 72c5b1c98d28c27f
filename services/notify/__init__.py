"""Notifications: dispatches to a department's duty contact, SLA warnings and breaches, and the resident's 回访
link once their issue is resolved, sent through a :class:`~services.notify.notifier.Notifier`."""
