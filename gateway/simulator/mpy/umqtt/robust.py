"""Host implementation of ``umqtt.robust``: reconnects on socket errors."""

import time

from . import simple


class MQTTClient(simple.MQTTClient):
    DELAY = 2
    DEBUG = False

    def delay(self, i):
        time.sleep(self.DELAY)

    def log(self, in_reconnect, e):
        if self.DEBUG:
            print("mqtt%s:" % (" reconnect" if in_reconnect else ""), repr(e))

    def reconnect(self):
        i = 0
        while True:
            try:
                return super().connect(False)
            except OSError as e:
                self.log(True, e)
                i += 1
                self.delay(i)

    def _retry(self, fn, *args, **kw):
        while True:
            try:
                return fn(*args, **kw)
            except OSError as e:
                self.log(False, e)
            self.reconnect()

    def publish(self, topic, msg, retain=False, qos=0):
        return self._retry(super().publish, topic, msg, retain, qos)

    def wait_msg(self):
        return self._retry(super().wait_msg)

    def check_msg(self, attempts=2):
        while attempts:
            self.sock.setblocking(False)
            try:
                return super().wait_msg()
            except OSError as e:
                self.log(False, e)
            self.reconnect()
            attempts -= 1
