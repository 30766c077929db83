"""Small test doubles shared by the tests."""


class Recorder:
    """A collector that keeps every event it is handed."""

    def __init__(self, name: str = "Recorder") -> None:
        self.name = name
        self.events = []
        self.closed = False

    def handle(self, events):
        self.events.extend(events)

    def close(self):
        self.closed = True

    def topics(self):
        return [e.topic for e in self.events]

    def values(self, topic, param=None):
        return [e.value for e in self.events
                if e.topic == topic and e.tags.get("param") == param]
