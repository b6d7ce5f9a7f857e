"""A paced Locust user's schedule, apart from the locustfile: importing locust monkey-patches with
gevent, which a test process must not do."""


class Pacing:
    """One paced user's schedule: a request every period from its own start, or at once when the
    last answer came later than that (no catching up). Locust's constant_throughput counts from the
    user's creation, so it sent every user's second request one period after the spawn, all at once,
    and undid the start spread over one period in LLMUser.on_start."""
    def __init__(self, period: float, start: float) -> None:
        self.period, self.next_at = period, start

    def wait(self, now: float) -> float:
        self.next_at = max(self.next_at + self.period, now)
        return self.next_at - now
