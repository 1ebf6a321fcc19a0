"""Prometheus metrics on a private registry (tests create many apps in one process).

Under `nudges serve --workers N` each worker process counts in files of prometheus_client's multiprocess
mode (a folder the parent makes, PROMETHEUS_MULTIPROC_DIR) and /metrics answers the sum over every
worker, whichever of them takes the scrape: counted per process, a scrape saw one worker's counts, and
Prometheus read each change of worker as a counter reset."""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own name for it


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("nudges_requests_total", "HTTP requests", ["service", "status"],
                                registry=self.registry)
        self.latency = Histogram("nudges_request_seconds", "HTTP request latency", ["service"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
                                 registry=self.registry)
        self.cards = Counter("nudges_cards_total", "cards returned", ["rule"], registry=self.registry)
        self.suppressed = Counter("nudges_cards_suppressed_total", "cards a rule raised that suppression held back "
                                  "(shown about the same focus within its window, or locked out by feedback)",
                                  ["rule"], registry=self.registry)
        # Reason labels are bounded: a code the rule offers, "none" (no coded reason) or "other".
        self.feedback = Counter("nudges_feedback_total", "card feedback stored, by rule, outcome and override reason",
                                ["rule", "outcome", "reason"], registry=self.registry)
        self.rule_errors = Counter("nudges_rule_errors_total", "rules that raised while evaluating",
                                   ["rule"], registry=self.registry)
        self.reloads = Counter("nudges_rule_reloads_total", "rule set reloads", ["result"],
                               registry=self.registry)
        # Gauges under several workers: the value last set by any of them (each reads the same database
        # and rule folder); ignored in a single process.
        self.rules_loaded = Gauge("nudges_rules_loaded", "rules in the served set", registry=self.registry,
                                  multiprocess_mode="mostrecent")
        # Between visits: pushes (the outbox) and the subscriptions that bring events.
        self.deliveries = Counter("nudges_deliveries_total", "push attempts by outcome (sent, retry, dead, lost)",
                                  ["channel", "outcome"], registry=self.registry)
        self.outbox = Gauge("nudges_outbox", "deliveries in the outbox by status (dead ones stay until requeued)",
                            ["status"], registry=self.registry, multiprocess_mode="mostrecent")
        self.subscriptions = Gauge("nudges_subscriptions", "managed subscriptions by status", ["status"],
                                   registry=self.registry, multiprocess_mode="mostrecent")
        self.missed_events = Counter("nudges_subscription_missed_events_total",
                                     "events found missing (event-number gaps, counts ahead of what arrived)",
                                     registry=self.registry)
        self.recoveries = Counter("nudges_subscription_recoveries_total", "recoveries of missed events by result",
                                  ["method", "result"], registry=self.registry)

    def exposition(self) -> bytes:
        """The text a scrape gets: this process's registry, or every worker's under `serve --workers N`."""
        folder = os.environ.get(MULTIPROCESS_DIR)
        if folder and Path(folder).is_dir():
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=folder)
            return generate_latest(registry)
        return generate_latest(self.registry)
