/* estat_ingest._speedups: the NDJSON body's two per-event loops in C (issue 16).
 *
 *   split_lines(body) -> (lines, most_openers)
 *       The lines of an NDJSON body without '\r': what http/bodies.py `ndjson_lines` returns (every
 *       non-empty line that is not whitespace only, without its line feed) and, in the same pass,
 *       what `max_openers` returns (the most '[' plus '{' on one line).
 *   records(ts, head, bodies, mid, first, tail) -> (items, nbytes)
 *       The queue items `(ts, line)` of one request: for body i, line = head + JSON string of the
 *       body + mid + the 6 hex digits of (first + i) & 0xFFFFFF + tail, where the JSON string is
 *       byte for byte what orjson.dumps(body.decode()) gives for a body of valid UTF-8 (the caller
 *       guarantees that: simdjson or a strict decode checked it). nbytes: the lines' total length.
 *   use_shuffles(on) -> bool
 *       Whether escapes use the SSSE3 shuffles (the default where the CPU has SSSE3) or the word
 *       loop: how tests run both paths.
 *   record(ts, ip, user_agent, cookie, body, id_prefix, counter, extra) -> bytes
 *       One event's whole record line, as pipeline/record.py `encode_line` defines it: the three
 *       header fields are str (TypeError, as orjson raises, for one holding surrogates), the body
 *       bytes of valid UTF-8; `{"ts":int(ts),"ip":…,"user_agent":…,"cookie":…,"body":…,"id":"<id_prefix>
 *       <6 hex of counter>"<extra>}` and a line feed.
 *
 * The pure-Python definitions stay in http/bodies.py and pipeline/record.py; they are the fallback
 * when this module is not built and the oracle of tests/pipeline/test_speedups.py.
 * Only bytes objects are read and only new bytes, tuples and lists are made: nothing is kept
 * between calls, the GIL is held throughout (the work per call is one request's body, <= MAX_BODY_SIZE).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define CHUNK ((Py_ssize_t)1 << 24) /* bytes counted with 32-bit counters at a time */

static const char HEX[] = "0123456789abcdef";

/* How many bytes each input byte takes in a JSON string as orjson writes it: 1, 2 (\" \\ \b \t \n \f \r)
 * or 6 (\u00XX for the other controls). */
static unsigned char ESC_LEN[256];
/* The letter after the backslash of a two-byte escape (`"`, `\\`, b, t, n, f, r); 0 for the rest. */
static unsigned char ESC_CHAR[256];

static void init_tables(void) {
    for (int c = 0; c < 256; c++)
        ESC_LEN[c] = 1;
    for (int c = 0; c < 0x20; c++)
        ESC_LEN[c] = 6;
    ESC_LEN['"'] = ESC_LEN['\\'] = 2;
    ESC_LEN['\b'] = ESC_LEN['\t'] = ESC_LEN['\n'] = ESC_LEN['\f'] = ESC_LEN['\r'] = 2;
    ESC_CHAR['"'] = '"';
    ESC_CHAR['\\'] = '\\';
    ESC_CHAR['\b'] = 'b';
    ESC_CHAR['\t'] = 't';
    ESC_CHAR['\n'] = 'n';
    ESC_CHAR['\f'] = 'f';
    ESC_CHAR['\r'] = 'r';
}

static PyObject *split_lines(PyObject *self, PyObject *arg) {
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "split_lines() takes bytes");
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(arg);
    const unsigned char *end = p + PyBytes_GET_SIZE(arg);
    PyObject *lines = PyList_New(0);
    if (lines == NULL)
        return NULL;
    Py_ssize_t most = 0;
    while (p < end) {
        const unsigned char *nl = memchr(p, '\n', (size_t)(end - p));
        const unsigned char *e = nl ? nl : end;
        Py_ssize_t opens = 0;
        unsigned int solid = 0; /* a byte that is not ASCII whitespace (bytes.isspace: 9-13 and 32) */
        for (const unsigned char *at = p; at < e; at += CHUNK) {
            const unsigned char *stop = e - at < CHUNK ? e : at + CHUNK;
            uint32_t o = 0;
            unsigned char sol = 0;
            for (const unsigned char *q = at; q < stop; q++) { /* a loop the compiler vectorizes */
                unsigned char c = *q;
                o += (c == '[') + (c == '{');
                sol |= (c != ' ') & ((unsigned char)(c - 9) > 4);
            }
            opens += o;
            solid |= sol;
        }
        if (opens > most)
            most = opens;
        if (solid) {
            PyObject *line = PyBytes_FromStringAndSize((const char *)p, e - p);
            if (line == NULL || PyList_Append(lines, line) < 0) {
                Py_XDECREF(line);
                Py_DECREF(lines);
                return NULL;
            }
            Py_DECREF(line);
        }
        if (nl == NULL)
            break;
        p = nl + 1;
    }
    return Py_BuildValue("(Nn)", lines, most);
}

/* The escaped length of s[0:n] (each byte's ESC_LEN); in the common case (no control byte) two
 * counts the compiler vectorizes (32-bit counters, so chunks of at most 2^24 bytes). */
static Py_ssize_t escaped_len(const unsigned char *s, Py_ssize_t n) {
    Py_ssize_t special = 0, controls = 0;
    for (Py_ssize_t at = 0; at < n; at += CHUNK) {
        Py_ssize_t stop = n - at < CHUNK ? n : at + CHUNK;
        uint32_t sp = 0, ctl = 0;
        for (Py_ssize_t i = at; i < stop; i++) {
            unsigned char c = s[i];
            sp += (c == '"') + (c == '\\');
            ctl += c < 0x20;
        }
        special += sp;
        controls += ctl;
    }
    if (controls == 0)
        return n + special;
    Py_ssize_t len = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        len += ESC_LEN[s[i]];
    return len;
}

/* One byte JSON escapes, written at out: `\\` and ESC_CHAR[c] when it has one, else \\u00XX. */
static inline char *escape_byte(char *out, unsigned char c) {
    out[0] = '\\';
    if (ESC_CHAR[c]) {
        out[1] = (char)ESC_CHAR[c];
        return out + 2;
    }
    out[1] = 'u';
    out[2] = '0';
    out[3] = '0';
    out[4] = HEX[c >> 4];
    out[5] = HEX[c & 15];
    return out + 6;
}

#if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define WORDWISE 1
/* The high bit of each byte of x that is zero, exactly (no borrow crosses a byte). */
static inline uint64_t zero_bytes(uint64_t x) {
    const uint64_t low7 = 0x7f7f7f7f7f7f7f7fULL;
    return ~(((x & low7) + low7) | x) & ~low7;
}
/* The high bit of each byte of w that JSON escapes: '"', '\\' and the controls below 0x20. */
static inline uint64_t special_bytes(uint64_t w) {
    return zero_bytes(w ^ 0x2222222222222222ULL) | zero_bytes(w ^ 0x5c5c5c5c5c5c5c5cULL)
           | zero_bytes(w & 0xe0e0e0e0e0e0e0e0ULL);
}
#endif

/* s[0:n] as the inside of a JSON string, written at out, which has room for its escaped length
 * (escaped_len) and 7 bytes more that the caller writes after it (every caller follows a field
 * with at least 7 bytes: a closing quote and the next key, or the id's 6 hex digits): the words
 * stored whole may write up to 7 bytes past the field's end, which the caller's later writes
 * replace. Eight bytes at a time: a word with nothing to escape is one 8-byte store; otherwise
 * each byte to escape (found from the word's mask, lowest first) is written after the bytes
 * before it, which go out as one store of the word shifted. */
static char *escape_words(char *out, const unsigned char *s, Py_ssize_t n) {
    Py_ssize_t i = 0;
#ifdef WORDWISE
    for (; n - i >= 8; i += 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        uint64_t m = special_bytes(w);
        if (m == 0) {
            memcpy(out, &w, 8);
            out += 8;
            continue;
        }
        int prev = 0; /* the first byte of the word not yet written */
        do {
            int k = __builtin_ctzll(m) >> 3; /* the next byte to escape */
            uint64_t part = w >> (8 * prev);
            memcpy(out, &part, 8); /* bytes prev..k-1 are kept, the rest is overwritten below */
            out += k - prev;
            out = escape_byte(out, (unsigned char)(w >> (8 * k)));
            prev = k + 1;
            m &= m - 1;
        } while (m);
        if (prev < 8) {
            uint64_t part = w >> (8 * prev);
            memcpy(out, &part, 8);
            out += 8 - prev;
        }
    }
#endif
    for (; i < n; i++) {
        unsigned char c = s[i];
        if (ESC_LEN[c] == 1)
            *out++ = (char)c;
        else
            out = escape_byte(out, c);
    }
    return out;
}

#if defined(__GNUC__) && defined(__x86_64__)
#define SHUFFLES 1
#include <immintrin.h>
/* For each mask m of 8 bytes to escape (bit k: byte k), the pshufb control that spreads the 8 bytes
 * over 8 + popcount(m) with a backslash (index 8) before each marked byte; SHUF_LEN its length. */
static unsigned char SHUF[256][16] __attribute__((aligned(16)));
static unsigned char SHUF_LEN[256];
static int have_ssse3;

static void init_shuffles(void) {
    for (int m = 0; m < 256; m++) {
        int j = 0;
        for (int k = 0; k < 8; k++) {
            if (m >> k & 1)
                SHUF[m][j++] = 8;
            SHUF[m][j++] = (unsigned char)k;
        }
        SHUF_LEN[m] = (unsigned char)j;
        while (j < 16)
            SHUF[m][j++] = 8;
    }
    __builtin_cpu_init();
    have_ssse3 = __builtin_cpu_supports("ssse3");
}

/* escape_words, 16 bytes at a time while at least 24 are left: a block with nothing to escape is one
 * 16-byte store; a block whose bytes to escape are all '"' or '\\' (each becomes a backslash and
 * itself) is two shuffles of its halves with the backslash beside them, each stored whole (16 bytes)
 * and followed by its length; a block holding a control goes to escape_words. A store may write up
 * to 8 bytes past what its half produced; the >= 8 bytes left after the block produce at least 8
 * more, written next, so nothing past the field is touched here. */
__attribute__((target("ssse3"))) static char *escape_shuffled(char *out, const unsigned char *s, Py_ssize_t n) {
    const __m128i quote = _mm_set1_epi8('"'), backslash = _mm_set1_epi8('\\'), last_ctl = _mm_set1_epi8(0x1f);
    Py_ssize_t i = 0;
    for (; n - i >= 24; i += 16) {
        __m128i x = _mm_loadu_si128((const __m128i *)(s + i));
        __m128i ctl = _mm_cmpeq_epi8(_mm_max_epu8(x, last_ctl), last_ctl); /* x <= 0x1f */
        __m128i esc = _mm_or_si128(_mm_cmpeq_epi8(x, quote), _mm_cmpeq_epi8(x, backslash));
        unsigned m = (unsigned)_mm_movemask_epi8(_mm_or_si128(esc, ctl));
        if (m == 0) {
            _mm_storeu_si128((__m128i *)out, x);
            out += 16;
        } else if (_mm_movemask_epi8(ctl)) {
            out = escape_words(out, s + i, 16);
        } else {
            unsigned lo = m & 0xff, hi = m >> 8;
            __m128i a = _mm_shuffle_epi8(_mm_unpacklo_epi64(x, backslash), _mm_load_si128((const __m128i *)SHUF[lo]));
            _mm_storeu_si128((__m128i *)out, a);
            out += SHUF_LEN[lo];
            __m128i b = _mm_shuffle_epi8(_mm_unpackhi_epi64(x, backslash), _mm_load_si128((const __m128i *)SHUF[hi]));
            _mm_storeu_si128((__m128i *)out, b);
            out += SHUF_LEN[hi];
        }
    }
    return escape_words(out, s + i, n - i);
}
#endif

/* s[0:n] as the inside of a JSON string (escape_words' contract): the shuffles where the CPU has
 * SSSE3, else the word loop. */
static inline char *escape_into(char *out, const unsigned char *s, Py_ssize_t n) {
#ifdef SHUFFLES
    if (have_ssse3)
        return escape_shuffled(out, s, n);
#endif
    return escape_words(out, s, n);
}

/* An id's counter, (counter & 0xFFFFFF) as 6 lower-case hex digits, at out; returns the end. */
static inline char *put_id_counter(char *out, unsigned long counter) {
    counter &= 0xFFFFFFUL;
    for (int k = 5; k >= 0; k--) {
        out[k] = HEX[counter & 15];
        counter >>= 4;
    }
    return out + 6;
}

static PyObject *records(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "records(ts, head, bodies, mid, first, tail) takes 6 arguments");
        return NULL;
    }
    PyObject *ts = args[0], *head = args[1], *bodies = args[2], *mid = args[3], *tail = args[5];
    if (!PyBytes_Check(head) || !PyBytes_Check(mid) || !PyBytes_Check(tail) || !PyList_Check(bodies)) {
        PyErr_SetString(PyExc_TypeError, "records(): head, mid and tail are bytes, bodies a list of bytes");
        return NULL;
    }
    unsigned long first = PyLong_AsUnsignedLongMask(args[4]);
    if (first == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t hlen = PyBytes_GET_SIZE(head), mlen = PyBytes_GET_SIZE(mid), tlen = PyBytes_GET_SIZE(tail);
    Py_ssize_t n = PyList_GET_SIZE(bodies);
    PyObject *items = PyList_New(n);
    if (items == NULL)
        return NULL;
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *body = PyList_GET_ITEM(bodies, i);
        if (!PyBytes_Check(body)) {
            PyErr_SetString(PyExc_TypeError, "records(): every body is bytes");
            goto fail;
        }
        const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(body);
        Py_ssize_t blen = PyBytes_GET_SIZE(body);
        Py_ssize_t size = hlen + 1 + escaped_len(s, blen) + 1 + mlen + 6 + tlen;
        PyObject *line = PyBytes_FromStringAndSize(NULL, size);
        if (line == NULL)
            goto fail;
        char *out = PyBytes_AS_STRING(line);
        memcpy(out, PyBytes_AS_STRING(head), (size_t)hlen);
        out += hlen;
        *out++ = '"';
        out = escape_into(out, s, blen);
        *out++ = '"';
        memcpy(out, PyBytes_AS_STRING(mid), (size_t)mlen);
        out += mlen;
        out = put_id_counter(out, first + (unsigned long)i);
        memcpy(out, PyBytes_AS_STRING(tail), (size_t)tlen);
        total += size;
        PyObject *item = PyTuple_New(2);
        if (item == NULL) {
            Py_DECREF(line);
            goto fail;
        }
        Py_INCREF(ts);
        PyTuple_SET_ITEM(item, 0, ts);
        PyTuple_SET_ITEM(item, 1, line);
        PyList_SET_ITEM(items, i, item);
    }
    return Py_BuildValue("(Nn)", items, total);
fail:
    Py_DECREF(items); /* the unset slots are NULL, which list_dealloc skips */
    return NULL;
}

/* The UTF-8 of a str field, or NULL with TypeError (as orjson raises) for text holding surrogates. */
static const char *field_utf8(PyObject *text, Py_ssize_t *n) {
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "record(): ip, user_agent and cookie are str");
        return NULL;
    }
    const char *u = PyUnicode_AsUTF8AndSize(text, n);
    if (u == NULL && PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
        PyErr_SetString(PyExc_TypeError, "str is not valid UTF-8: surrogates not allowed");
    }
    return u;
}

/* Decimal digits of v at out (as orjson writes an int); returns the end. */
static char *put_int(char *out, long long v) {
    char tmp[24];
    int k = 0;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        tmp[k++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        *out++ = '-';
    while (k)
        *out++ = tmp[--k];
    return out;
}

#define LIT(out, s) (memcpy((out), (s), sizeof(s) - 1), (out) + sizeof(s) - 1)

static PyObject *record(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError,
                        "record(ts, ip, user_agent, cookie, body, id_prefix, counter, extra) takes 8 arguments");
        return NULL;
    }
    double ts = PyFloat_AsDouble(args[0]);
    if (ts == -1.0 && PyErr_Occurred())
        return NULL;
    if (!(ts > -9.2e18 && ts < 9.2e18)) {
        PyErr_SetString(PyExc_ValueError, "record(): ts out of range");
        return NULL;
    }
    PyObject *body = args[4], *prefix = args[5], *extra = args[7];
    if (!PyBytes_Check(body) || !PyBytes_Check(prefix) || !PyBytes_Check(extra)) {
        PyErr_SetString(PyExc_TypeError, "record(): body, id_prefix and extra are bytes");
        return NULL;
    }
    unsigned long counter = PyLong_AsUnsignedLongMask(args[6]);
    if (counter == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t n_ip, n_ua, n_ck;
    const char *ip = field_utf8(args[1], &n_ip);
    if (ip == NULL)
        return NULL;
    const char *ua = field_utf8(args[2], &n_ua);
    if (ua == NULL)
        return NULL;
    const char *ck = field_utf8(args[3], &n_ck);
    if (ck == NULL)
        return NULL;
    const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(body);
    Py_ssize_t n_b = PyBytes_GET_SIZE(body), n_p = PyBytes_GET_SIZE(prefix), n_x = PyBytes_GET_SIZE(extra);
    char digits[24];
    Py_ssize_t n_ts = put_int(digits, (long long)ts) - digits; /* int(ts): truncated toward zero */
    Py_ssize_t size = sizeof("{\"ts\":") - 1 + n_ts + sizeof(",\"ip\":\"") - 1
                      + escaped_len((const unsigned char *)ip, n_ip) + sizeof("\",\"user_agent\":\"") - 1
                      + escaped_len((const unsigned char *)ua, n_ua) + sizeof("\",\"cookie\":\"") - 1
                      + escaped_len((const unsigned char *)ck, n_ck) + sizeof("\",\"body\":\"") - 1
                      + escaped_len(b, n_b) + sizeof("\",\"id\":\"") - 1 + n_p + 6 + 1 + n_x + 2;
    PyObject *line = PyBytes_FromStringAndSize(NULL, size);
    if (line == NULL)
        return NULL;
    char *out = PyBytes_AS_STRING(line);
    out = LIT(out, "{\"ts\":");
    memcpy(out, digits, (size_t)n_ts);
    out += n_ts;
    out = LIT(out, ",\"ip\":\"");
    out = escape_into(out, (const unsigned char *)ip, n_ip);
    out = LIT(out, "\",\"user_agent\":\"");
    out = escape_into(out, (const unsigned char *)ua, n_ua);
    out = LIT(out, "\",\"cookie\":\"");
    out = escape_into(out, (const unsigned char *)ck, n_ck);
    out = LIT(out, "\",\"body\":\"");
    out = escape_into(out, b, n_b);
    out = LIT(out, "\",\"id\":\"");
    memcpy(out, PyBytes_AS_STRING(prefix), (size_t)n_p);
    out += n_p;
    out = put_id_counter(out, counter);
    *out++ = '"';
    memcpy(out, PyBytes_AS_STRING(extra), (size_t)n_x);
    out += n_x;
    *out++ = '}';
    *out++ = '\n';
    return line;
}

/* use_shuffles(on) -> bool: whether escapes take the SSSE3 shuffles from now on (only where the CPU
 * has SSSE3): the switch by which tests hold both escape paths to the Python definitions. */
static PyObject *use_shuffles(PyObject *self, PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
#ifdef SHUFFLES
    have_ssse3 = on && __builtin_cpu_supports("ssse3");
    return PyBool_FromLong(have_ssse3);
#else
    return PyBool_FromLong(0);
#endif
}

static PyMethodDef methods[] = {
    {"use_shuffles", (PyCFunction)use_shuffles, METH_O,
     "use_shuffles(on) -> bool: whether escapes use the SSSE3 shuffles from now on (a switch for tests)"},
    {"split_lines", (PyCFunction)split_lines, METH_O,
     "split_lines(body) -> (lines, most_openers): http/bodies.py ndjson_lines and max_openers, one pass"},
    {"records", (PyCFunction)(void (*)(void))records, METH_FASTCALL,
     "records(ts, head, bodies, mid, first, tail) -> (items, nbytes): the queue items of one request"},
    {"record", (PyCFunction)(void (*)(void))record, METH_FASTCALL,
     "record(ts, ip, user_agent, cookie, body, id_prefix, counter, extra) -> bytes: one event's record line"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "estat_ingest._speedups",
    "The NDJSON body's per-event loops in C; pure-Python definitions in http/bodies.py and pipeline/record.py.",
    -1, methods,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    init_tables();
#ifdef SHUFFLES
    init_shuffles();
#endif
    return PyModule_Create(&module);
}
