"""A replicated counter on PySyncObj, shared by the adapter's tests (import after ``importorskip("pysyncobj")``)."""

from pysyncobj import SyncObj, replicated


class Counter(SyncObj):
    """One replicated integer: ``add(v)`` returns the new value, ``value()`` reads it."""

    def __init__(self, addr, conf, partners=()):
        super().__init__(addr, list(partners), conf)
        self.__value = 0

    @replicated
    def add(self, v):
        self.__value += v
        return self.__value

    def value(self):
        return self.__value
