# The on-board LED. Built without a value, so start-up never changes it
# (docs: don't switch outputs at boot); its state is read back once.

ON = "on"
OFF = "off"


class Led:
    def __init__(self, pin=None):
        if pin is None:
            import machine
            pin = machine.Pin("LED", machine.Pin.OUT)
        self.pin = pin
        try:
            self.state = 1 if pin.value() else 0
        except Exception:   # a port that cannot read an output back
            self.state = 0

    def set(self, on):
        self.state = 1 if on else 0
        self.pin.value(self.state)
        return self.state

    def toggle(self):
        return self.set(not self.state)

    def word(self):
        return ON if self.state else OFF


def parse_word(text):
    # An LED command as users type it (MQTT cmd/led, serial led=...):
    # on/off/toggle in any case, 1/0, true/false. Returns "on", "off",
    # "toggle" or None for anything else.
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode()
        except Exception:
            return None
    t = text.strip().lower()
    if t in ("on", "1", "true"):
        return ON
    if t in ("off", "0", "false"):
        return OFF
    if t == "toggle":
        return "toggle"
    return None


def apply(led, word):
    # Carry out a parsed word on a Led; returns the new state (0/1).
    if word == "toggle":
        return led.toggle()
    return led.set(word == ON)
