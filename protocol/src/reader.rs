//! A bounds-checked big-endian cursor over a frame. Offsets in errors are absolute positions
//! in the underlying buffer, so they point into the frame or datagram the caller holds.

use bytes::Bytes;

use crate::FrameError;

pub(crate) struct Reader<'a> {
    /// The whole buffer, for zero-copy [`Reader::bytes`].
    buf: &'a Bytes,
    /// The unread part of the window: `buf[pos..end]`.
    // NB: a shrinking slice rather than `buf` + `pos`: each read is one length compare and a
    // pointer bump, with no reload of the `Bytes` header; `pos` is derived only for errors.
    rest: &'a [u8],
    end: usize,
}

impl<'a> Reader<'a> {
    /// Reads `buf[start..end]`; `end` is clamped to the buffer.
    pub(crate) fn new(buf: &'a Bytes, start: usize, end: usize) -> Self {
        let end = end.min(buf.len());
        Reader {
            buf,
            rest: buf.get(start.min(end)..end).unwrap_or_default(),
            end,
        }
    }

    #[inline]
    pub(crate) fn pos(&self) -> usize {
        self.end - self.rest.len()
    }

    #[inline]
    pub(crate) fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// The next `N` bytes.
    #[inline]
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        match self.rest.split_first_chunk::<N>() {
            Some((a, tail)) => {
                self.rest = tail;
                Ok(*a)
            }
            None => Err(self.truncated()),
        }
    }

    #[inline]
    pub(crate) fn u8(&mut self) -> Result<u8, FrameError> {
        self.array().map(u8::from_be_bytes)
    }

    #[inline]
    pub(crate) fn u16(&mut self) -> Result<u16, FrameError> {
        self.array().map(u16::from_be_bytes)
    }

    #[inline]
    pub(crate) fn u32(&mut self) -> Result<u32, FrameError> {
        self.array().map(u32::from_be_bytes)
    }

    /// The next `n` bytes as a zero-copy slice of the frame.
    pub(crate) fn bytes(&mut self, n: usize) -> Result<Bytes, FrameError> {
        let start = self.pos();
        self.slice(n)?;
        // In bounds: `slice` checked `start + n <= end <= buf.len()`.
        Ok(self.buf.slice(start..start + n))
    }

    /// The next `n` bytes, borrowed.
    #[inline]
    pub(crate) fn slice(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        match self.rest.split_at_checked(n) {
            Some((out, tail)) => {
                self.rest = tail;
                Ok(out)
            }
            None => Err(self.truncated()),
        }
    }

    /// Fails unless every byte up to the end was read.
    pub(crate) fn finish(&self) -> Result<(), FrameError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(FrameError::TrailingBytes { offset: self.pos() })
        }
    }

    #[cold]
    fn truncated(&self) -> FrameError {
        FrameError::Truncated { offset: self.pos() }
    }
}
