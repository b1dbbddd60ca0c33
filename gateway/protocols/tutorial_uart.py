"""The tutorial's UART firmware: ``led_on\\r``/``led_off\\r`` in, ``on\\r\\n``/``off\\r\\n`` out.

That firmware sends no readings and has no query, so the LED state comes only
from its answers, and the link counts as online while the port is open and the
Pico answers (a command with no answer marks it offline until the next answer).
Nor does it say when it restarts (its LED then goes off): the state shown is the
last answer's until the next one, and the device's diagnostics say so in
``led_state``: ``unknown`` before any answer (no ``state/led`` at all), then
``assumed`` (the last answer's, unaware of any reset of the Pico since).
"""

from __future__ import annotations

import threading

from gateway.domain import MAY_STILL_HAPPEN, CommandError, LedCommand
from gateway.protocols.session import ByteLink, SerialSession

MAX_LINE = 64  # the firmware's answers are 4 bytes; anything longer is noise


class TutorialUartSession(SerialSession):
    def __init__(self, link: ByteLink) -> None:
        super().__init__(link)
        self._buf = bytearray()
        self._answer: str | None = None
        self._answered = threading.Condition()
        self.state: bool | None = None
        link.diagnostic_fields = {"led_state": "unknown"}

    def connected(self) -> None:
        self._buf.clear()
        self.link.set_online(True, "port open")

    def received(self, data: bytes) -> None:
        self._buf += data
        while (nl := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:nl]).strip()
            del self._buf[: nl + 1]
            if line in (b"on", b"off"):
                self._got(line.decode())
            elif line:
                self.link.stats["noise"] += 1
        if len(self._buf) > MAX_LINE:
            self.link.stats["noise"] += 1
            self._buf.clear()

    def _got(self, answer: str) -> None:
        self.link.stats["frames"] += 1
        self.state = answer == "on"
        self.link.diagnostic_fields = {"led_state": "assumed"}
        self.link.set_online(True, "answered")
        self.link.events.led_state(self.link.device, self.state)
        with self._answered:
            self._answer = answer
            self._answered.notify_all()

    def set_led(self, command: LedCommand) -> bool:
        if command is LedCommand.TOGGLE:
            if self.state is None:
                raise CommandError("cannot toggle: the tutorial firmware has no query and no answer was seen yet; "
                                   "send on or off")
            command = LedCommand.OFF if self.state else LedCommand.ON
        with self._answered:
            self._answer = None
        self.link.write(b"led_on\r" if command is LedCommand.ON else b"led_off\r")
        with self._answered:
            self._answered.wait_for(lambda: self._answer is not None, self.link.config.command_timeout)
            answer = self._answer
        if answer is None:
            self.link.stats["command_timeouts"] += 1
            self.link.set_online(False, "no answer to a command")
            raise CommandError(f"no answer from the Pico within {self.link.config.command_timeout:g} s; "
                               f"{MAY_STILL_HAPPEN}")
        if answer != command.value:
            raise CommandError(f"the Pico answered {answer!r} to {command.value!r}")
        return answer == "on"
