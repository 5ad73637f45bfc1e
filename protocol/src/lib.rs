//! Sans-io codec for the Teltonika tracker protocol. (Being written: see issue 2.)
