/* tests/core/test_fiber.c — C unit tests of the fiber runtime (core/fiber.c),
 * driving it through its C API the way core modules do. */
int main(void) { return 0; }
