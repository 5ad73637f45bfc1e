//! A bounds-checked big-endian cursor over a frame. Offsets in errors are absolute positions
//! in the underlying buffer, so they point into the frame or datagram the caller holds.

use bytes::Bytes;

use crate::FrameError;

pub(crate) struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    /// Reads `buf[start..end]`; `end` is clamped to the buffer.
    pub(crate) fn new(buf: &'a Bytes, start: usize, end: usize) -> Self {
        let end = end.min(buf.len());
        Reader {
            buf,
            pos: start.min(end),
            end,
        }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.end - self.pos
    }

    /// The next `N` bytes.
    #[inline]
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let window = self.buf.get(self.pos..self.end).unwrap_or_default();
        match window.first_chunk::<N>() {
            Some(a) => {
                self.pos += N;
                Ok(*a)
            }
            None => Err(FrameError::Truncated { offset: self.pos }),
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
        let stop = self
            .pos
            .checked_add(n)
            .filter(|&s| s <= self.end)
            .ok_or(FrameError::Truncated { offset: self.pos })?;
        let out = self.buf.slice(self.pos..stop);
        self.pos = stop;
        Ok(out)
    }

    /// The next `n` bytes, borrowed.
    pub(crate) fn slice(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let stop = self
            .pos
            .checked_add(n)
            .filter(|&s| s <= self.end)
            .ok_or(FrameError::Truncated { offset: self.pos })?;
        let out = self
            .buf
            .get(self.pos..stop)
            .ok_or(FrameError::Truncated { offset: self.pos })?;
        self.pos = stop;
        Ok(out)
    }

    /// Fails unless every byte up to the end was read.
    pub(crate) fn finish(&self) -> Result<(), FrameError> {
        if self.pos == self.end {
            Ok(())
        } else {
            Err(FrameError::TrailingBytes { offset: self.pos })
        }
    }
}
