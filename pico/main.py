# pico-gateway firmware: starts the link that config.py chooses.
# config.py is generated for each board (see config_example.py); every key
# but DEVICE and LINK has a default.

import sys

import core
import led as ledmod
import sensors as sensormod

import config

# config.LINK -> the module that runs that link (each has run(config, node)).
# tests/test_links_registry.py holds this table equal to the gateway's links.
LINKS = {
    "uart": "link_uart",
    "usb": "link_usb",
    "i2c": "link_i2c",
    "wifi": "link_wifi",
    "tcp": "link_tcp",
}


def make_node():
    led = ledmod.Led()
    s = sensormod.Sensors(getattr(config, "ADC_PINS", {}), getattr(config, "DIGITAL_PINS", {}))
    return core.Node(getattr(config, "DEVICE", "pico"), led, s)


def start():
    link = getattr(config, "LINK", "uart")
    if link not in LINKS:
        raise ValueError("config.LINK must be one of " + " ".join(sorted(LINKS)))
    node = make_node()
    mod = __import__(LINKS[link])
    mod.run(config, node)


def main():
    try:
        start()
    except KeyboardInterrupt:     # Ctrl-C from the REPL / mpremote: stop here
        raise
    except Exception as e:
        # Anything unexpected: say what (on usb it is REPL noise the gateway
        # ignores), wait a little and start over with a clean machine.
        print_exception = getattr(sys, "print_exception", None)
        if print_exception:
            print_exception(e)
        else:
            print("firmware error:", repr(e))
        if not getattr(config, "RESET_ON_ERROR", True):
            raise
        import time
        time.sleep(5)
        import machine
        machine.reset()


if __name__ == "__main__":
    main()
