"""Fan-out: this process's loaded threads and their subscribers, and the
channel-layer bridge that carries a thread's notifications to the
subscribers on other processes (``thread_hub``)."""
