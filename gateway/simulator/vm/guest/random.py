# The board's random: this VM build has none (its import fails: the unix
# port seeds it from a /dev/urandom WASI cannot open), a Pico has one seeded
# from its ring oscillator at boot.  Here: xorshift32 seeded from the host's
# entropy, with MicroPython's functions (getrandbits up to 32 bits, and the
# "extra" ones rp2 builds in).
import _picosim

_state = 1


def seed(n=None):
    global _state
    if n is None:
        n = int.from_bytes(_picosim.call("urandom", (4,)), "little")
    n &= 0xFFFFFFFF
    _state = n if n else 0x2545F491   # xorshift's one fixed point is 0


def _next():
    global _state
    x = _state
    x ^= (x << 13) & 0xFFFFFFFF
    x ^= x >> 17
    x ^= (x << 5) & 0xFFFFFFFF
    _state = x
    return x


def getrandbits(n):
    if n < 0 or n > 32:
        raise ValueError("bits must be 32 or less")
    if n == 0:
        return 0
    return _next() >> (32 - n)


def _below(n):
    # A number in [0, n): rejection sampling, as MicroPython's randrange does.
    if n <= 0:
        raise ValueError("empty range")
    bits = 0
    while (1 << bits) < n:
        bits += 1
    while True:
        r = getrandbits(bits) if bits <= 32 else (getrandbits(32) << (bits - 32)) | getrandbits(bits - 32)
        if r < n:
            return r


def randrange(start, stop=None, step=1):
    if stop is None:
        return _below(start)
    if step == 1:
        return start + _below(stop - start)
    if step > 0:
        n = (stop - start + step - 1) // step
    elif step < 0:
        n = (stop - start + step + 1) // step
    else:
        raise ValueError("step is 0")
    return start + step * _below(n)


def randint(a, b):
    return a + _below(b - a + 1)


def choice(seq):
    return seq[_below(len(seq))]


def random():
    return ((getrandbits(32) >> 5) * 67108864 + (getrandbits(32) >> 6)) / 9007199254740992


def uniform(a, b):
    return a + (b - a) * random()


seed()
